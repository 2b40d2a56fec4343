// The pipeline benchmark's LangGraph.js side (tests/bench/bench_pipeline.sh):
//   node bench.mjs FAKE_URL SHARED_JSON RUNS CONCURRENCY DB_PATH
// The same 5-step graph as Factory's `feature` pipeline (analysis -> architecture ->
// build -> verify -> docs), each step one chat completion from the same fake model
// (tests/tools/fake_model.lua) with the exact request bodies Factory's warm-up run
// sent (SHARED_JSON, written by tests/bench/pipeline.lua) and the same scripted
// COMPLETE TaskResult replies; a step parses and checks the TaskResult and adds its
// artifact to the graph state. State is checkpointed after every step by
// @langchain/langgraph-checkpoint-sqlite (SqliteSaver, a fresh file DB_PATH) when it
// loads, else by the in-memory MemorySaver (said in the output). One warm-up run,
// then RUNS runs by CONCURRENCY concurrent invokers.
// Prints runs/s, per-step wall time / model round trip / overhead and peak RSS
// (VmHWM), then "runs/s N", "overhead_ms N", "vmhwm_kb N", "checkpointer NAME".
import { readFileSync } from "node:fs";
import { performance } from "node:perf_hooks";
import { StateGraph, Annotation, START, END, MemorySaver } from "@langchain/langgraph";

const [url, sharedPath, runs, concurrency, dbPath] =
  [process.argv[2], process.argv[3], +process.argv[4], +process.argv[5], process.argv[6]];
const shared = JSON.parse(readFileSync(sharedPath, "utf8"));
const stages = shared.stages;

let checkpointer, checkpointerName;
try {
  const { SqliteSaver } = await import("@langchain/langgraph-checkpoint-sqlite");
  checkpointer = SqliteSaver.fromConnString(dbPath);
  checkpointerName = "SqliteSaver (@langchain/langgraph-checkpoint-sqlite, better-sqlite3, file " + dbPath.replace(/.*\//, "") + ")";
} catch (e) {
  checkpointer = new MemorySaver();
  checkpointerName = "MemorySaver (in memory, NOT durable: the SQLite checkpointer did not load: " + String(e.message).split("\n")[0] + ")";
}

const fake = async (method, path, body) => {
  const res = await fetch(url + path, { method, body: body && JSON.stringify(body),
                                        headers: body ? { "content-type": "application/json" } : {} });
  if (res.status !== 200) throw new Error(`fake model ${path}: ${res.status} ${await res.text()}`);
  return res.json();
};
const script = async (n) => {
  for (let i = 0; i < n; i += 500) {
    const list = [];
    for (let k = i; k < Math.min(n, i + 500); k++) list.push(shared.replies[k % shared.replies.length]);
    await fake("POST", "/_fake/script", list);
  }
};

let measuring = false, modelMs = 0, calls = 0;
const stepWall = Object.fromEntries(stages.map((s) => [s, 0]));
const stepModel = Object.fromEntries(stages.map((s) => [s, 0]));

const State = Annotation.Root({
  title: Annotation(),
  results: Annotation({ reducer: (a, b) => a.concat(b), default: () => [] }),
});

const step = (i) => async (state) => {
  const t0 = performance.now();
  const body = structuredClone(shared.requests[i]);
  const res = await fetch(url + "/v1/chat/completions", {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer sk-bench-pipeline-0000" },
    body: JSON.stringify(body),
  });
  if (res.status !== 200) throw new Error(`model: ${res.status} ${await res.text()}`);
  const reply = await res.json();
  const t1 = performance.now();
  const result = JSON.parse(reply.choices[0].message.content);
  if (result.status !== "COMPLETE" || !result.artifact || typeof result.reasoning !== "string")
    throw new Error("not a COMPLETE TaskResult: " + reply.choices[0].message.content);
  if (measuring) {
    modelMs += t1 - t0; calls++;
    stepModel[stages[i]] += t1 - t0;
    stepWall[stages[i]] += performance.now() - t0;
  }
  return { results: [{ stage: stages[i], status: result.status, artifact: result.artifact,
                       verified_facts: result.verified_facts, usage: reply.usage }] };
};

let g = new StateGraph(State);
stages.forEach((s, i) => { g = g.addNode(s, step(i)); });
g = g.addEdge(START, stages[0]);
for (let i = 1; i < stages.length; i++) g = g.addEdge(stages[i - 1], stages[i]);
g = g.addEdge(stages[stages.length - 1], END);
const graph = g.compile({ checkpointer });

const one = async (n) => {
  const out = await graph.invoke({ title: "Add due dates to tasks " + n },
                                 { configurable: { thread_id: "bench-" + n } });
  if (out.results.length !== stages.length) throw new Error(`run ${n}: ${out.results.length} results`);
};

// Warm-up, as on Factory's side.
await fake("POST", "/_fake/reset");
await script(stages.length);
await one(0);

await fake("POST", "/_fake/reset");
await script(runs * stages.length);
measuring = true;
let next = 0, done = 0;
const cpu0 = process.cpuUsage();
const t0 = performance.now();
await Promise.all(Array.from({ length: concurrency }, async () => {
  while (next < runs) { const n = ++next; await one(n); done++; }
}));
const secs = (performance.now() - t0) / 1000;
const cpu = process.cpuUsage(cpu0);
measuring = false;
const served = (await fake("GET", "/_fake/requests")).count;
if (done !== runs || served !== runs * stages.length) throw new Error(`done ${done}, fake served ${served}`);

const status = readFileSync("/proc/self/status", "utf8");
const hwm = +status.match(/VmHWM:\s*(\d+)/)[1], rss = +status.match(/VmRSS:\s*(\d+)/)[1];
const rate = runs / secs;
const steps = runs * stages.length;
const overhead = (secs * 1000 * concurrency - modelMs) / steps;
const cpuMs = (cpu.user + cpu.system) / 1000 / steps;
const f2 = (x) => x.toFixed(2).padStart(10);
console.log(`langgraph: ${runs} runs of the 5-step graph in ${secs.toFixed(3)} s = ${rate.toFixed(1)} runs/s (concurrency ${concurrency}; checkpointer ${checkpointerName})`);
console.log(`langgraph: per step (mean over ${runs} runs)  node ms   model ms`);
for (const s of stages) console.log(`  ${s.padEnd(14)} ${f2(stepWall[s] / runs)} ${f2(stepModel[s] / runs)}`);
console.log(`langgraph: "model ms" includes waiting for node's one event loop (better-sqlite3 is synchronous), so step wall minus model undercounts LangGraph's own time`);
console.log(`langgraph: CPU per step ${cpuMs.toFixed(3)} ms (user+sys of the node process, ${(cpu.system / 1000 / steps).toFixed(3)} ms of it system); wall per step at this throughput ${(secs * 1000 / steps).toFixed(3)} ms`);
console.log(`langgraph: peak RSS (VmHWM) ${hwm} kB (${(hwm / 1024).toFixed(1)} MiB), RSS at end ${rss} kB; ${calls} model calls`);
console.log(`runs/s ${rate.toFixed(3)}`);
console.log(`cpu_ms ${cpuMs.toFixed(3)}`);
console.log(`vmhwm_kb ${hwm}`);
console.log(`checkpointer ${checkpointer instanceof MemorySaver ? "MemorySaver" : "SqliteSaver"}`);
