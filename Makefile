# Factory — `make help` lists the targets.
#   make            build ./factory
#   make test       install missing Debian packages, build, run every test
#   make test SAN=1 the same under AddressSanitizer + UndefinedBehaviorSanitizer
#   make demo       run the demo on the embedded defaults
#   make bench      run the benchmarks under tests/bench (BENCH_SIZE=tiny for a smoke run)
#   make install PREFIX=/usr/local

VERSION := 0.1.0
PREFIX ?= /usr/local
DATADIR = $(PREFIX)/share/factory
CC ?= cc
SAN ?= 0

ifeq ($(SAN),1)
  BUILD := build/san
  BIN := factory-san
  OPT := -O1 -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined
else
  BUILD := build/rel
  BIN := factory
  OPT := -O2
endif

# Core modules: core/<name>.c is factory.core.<name> (and listed in core/modules.h).
CORE_MODULES := fiber json time env proc http_client fs repl db_sqlite db_pg http_server router hash signal git regex text
CORE_OBJS := $(CORE_MODULES:%=$(BUILD)/%.o)

# Recursive (=) so pkg-config runs after `make deps` has installed the packages.
PKG_CFLAGS = $(shell pkg-config --cflags luajit libuv libcurl sqlite3 libpq libcrypto jansson libgit2 yajl)
PKG_LIBS = $(shell pkg-config --libs luajit libuv libcurl sqlite3 libpq libcrypto jansson libgit2 yajl)
CFLAGS_ALL = -std=c11 -D_GNU_SOURCE -g $(OPT) -Wall -Wextra -Werror -Wshadow -Wno-unused-parameter \
	-DFACTORY_VERSION='"$(VERSION)"' -DFACTORY_DATADIR='"$(DATADIR)"' $(PKG_CFLAGS) $(CFLAGS)
LIBS_ALL = $(PKG_LIBS) -l:liblua5.1-cjson.a -lhttp_parser -ledit -lm $(LDLIBS)
LDFLAGS_ALL = $(OPT) -rdynamic $(LDFLAGS)

.PHONY: all deps build test demo bench bench-smoke install clean help

all: build

help:
	@sed -n '2,8p' Makefile | sed 's/^# *//'

deps:
	@sh tools/deps.sh

build: deps
	@$(MAKE) --no-print-directory $(BIN) $(BUILD)/test_fiber

$(BUILD)/%.o: core/%.c core/*.h | $(BUILD)
	$(CC) $(CFLAGS_ALL) -c $< -o $@

$(BUILD)/tests/%.o: tests/core/%.c core/*.h | $(BUILD)
	@mkdir -p $(BUILD)/tests
	$(CC) $(CFLAGS_ALL) -Icore -c $< -o $@

$(BUILD):
	@mkdir -p $(BUILD)

$(BIN): $(CORE_OBJS) $(BUILD)/main.o
	$(CC) $(LDFLAGS_ALL) -o $@ $^ $(LIBS_ALL)

# C unit tests link the core modules without main.c.
$(BUILD)/test_fiber: $(BUILD)/tests/test_fiber.o $(CORE_OBJS)
	$(CC) $(LDFLAGS_ALL) -o $@ $^ $(LIBS_ALL)

test: build
	@FACTORY_BIN=./$(BIN) BUILD=$(BUILD) sh tests/run.sh

demo: build
	./$(BIN) examples/replay/demo.lua

bench: build
	@FACTORY_BIN=./$(BIN) BUILD=$(BUILD) sh tests/bench/run.sh

bench-smoke: build
	@BENCH_SIZE=tiny FACTORY_BIN=./$(BIN) BUILD=$(BUILD) sh tests/bench/run.sh

install: build
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(DATADIR)
	install -m 755 $(BIN) $(DESTDIR)$(PREFIX)/bin/factory
	cp -R lua teams pipelines $(DESTDIR)$(DATADIR)/

clean:
	rm -rf build factory factory-san
