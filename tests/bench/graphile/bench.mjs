// The queue benchmark's workload through graphile-worker (tests/bench/bench_queue.sh):
//   node bench.mjs URL JOBS LATENCY_JOBS CONCURRENCY
// 1. throughput: JOBS jobs added in one statement, then one worker at CONCURRENCY
//    runs them (an empty task); prints jobs/s from the first start to the last finish.
// 2. latency: LATENCY_JOBS jobs added one at a time, paced, to an idle worker;
//    prints enqueue-to-start p50/p99 (the task's start minus the time before addJob).
import { run, makeWorkerUtils } from "graphile-worker";
import { performance } from "node:perf_hooks";

const [url, jobs, latencyJobs, concurrency] = [process.argv[2], +process.argv[3], +process.argv[4], +process.argv[5]];
const now = () => performance.timeOrigin + performance.now();
const pct = (xs, p) => xs.slice().sort((a, b) => a - b)[Math.min(xs.length - 1, Math.floor(xs.length * p))];
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

const utils = await makeWorkerUtils({ connectionString: url });
await utils.migrate();

let done = 0, first = 0, last = 0, finish;
const latencies = [];
const taskList = {
  bench: async () => {
    if (!first) first = now();
    last = now();
    if (++done === jobs) finish();
  },
  probe: async (payload) => {
    latencies.push(now() - payload.t);
    if (latencies.length === latencyJobs) finish();
  },
};

// Throughput: the backlog is added before the worker starts.
await utils.withPgClient((c) =>
  c.query("SELECT graphile_worker.add_job('bench', json_build_object('i', i)) FROM generate_series(1, $1) i", [jobs]));
let finished = new Promise((r) => (finish = r));
const runner = await run({ connectionString: url, concurrency, maxPoolSize: concurrency + 2, noHandleSignals: true, pollInterval: 1000,
  taskList, logger: new (await import("@graphile/logger")).Logger(() => () => {}) });
await finished;
const secs = (last - first) / 1000;
console.log(`graphile-worker: ${jobs} jobs in ${secs.toFixed(3)} s = ${Math.round(jobs / secs)} jobs/s (concurrency ${concurrency})`);

finished = new Promise((r) => (finish = r));
for (let i = 0; i < latencyJobs; i++) {
  await utils.addJob("probe", { t: now() });
  await sleep(2);
}
await finished;
console.log(`graphile-worker: enqueue-to-start p50 ${pct(latencies, 0.5).toFixed(2)} ms, p99 ${pct(latencies, 0.99).toFixed(2)} ms (${latencyJobs} jobs, one every ~2 ms)`);
await runner.stop();
await utils.release();
console.log(`jobs/s ${Math.round(jobs / secs)}`);
