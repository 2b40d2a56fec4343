/* core/proc.h — what other core modules need of factory.core.proc. */
#ifndef FACTORY_PROC_H
#define FACTORY_PROC_H

/* Puts the handler that kills the host's child process groups before SIGINT,
 * SIGTERM or SIGHUP ends the host back over each of those signals whose action is
 * the default (see "children die with the host" in proc.c). */
void proc_guard_signals(void);

#endif
