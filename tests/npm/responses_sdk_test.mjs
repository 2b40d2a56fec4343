// The official openai SDK's Responses API through `factory serve` (POST /v1/responses,
// what Codex speaks): a response, a streamed one (its events and final response), a
// function call answered with a function_call_output and continued, and the error an
// unknown model gets. Usage: node responses_sdk_test.mjs BASE_URL API_KEY MODEL
// Prints one JSON line with what the SDK saw; exits 1 on any unexpected failure.
import OpenAI from "openai";

const [base, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey, maxRetries: 0, timeout: 20000 });
const out = {};

const r = await client.responses.create({ model, instructions: "Be brief.", input: "Say hello" });
out.text = r.output_text;
out.status = r.status;
out.usage = r.usage;

const stream = await client.responses.create({ model, input: [{ role: "user", content: "Say hello" }], stream: true });
out.events = [];
out.stream = "";
for await (const ev of stream) {
  if (!out.events.includes(ev.type)) out.events.push(ev.type);
  if (ev.type === "response.output_text.delta") out.stream += ev.delta;
  if (ev.type === "response.completed") {
    const text = ev.response.output.filter((i) => i.type === "message")
      .flatMap((i) => i.content.map((c) => c.text)).join("");
    out.stream_final = { text, usage: ev.response.usage };
  }
}

const tools = [{
  type: "function", name: "get_weather", description: "The weather in a city",
  parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
}];
const question = [{ role: "developer", content: "Use tools." }, { role: "user", content: "Weather in Paris?" }];
const t = await client.responses.create({ model, input: question, tools, stream: true });
let call;
for await (const ev of t) {
  if (ev.type === "response.output_item.done" && ev.item.type === "function_call") call = ev.item;
}
out.tool = { name: call.name, args: JSON.parse(call.arguments), call_id: call.call_id };
const t2 = await client.responses.create({
  model, tools,
  input: [...question, { type: "function_call", call_id: call.call_id, name: call.name, arguments: call.arguments },
          { type: "function_call_output", call_id: call.call_id, output: "sunny" }],
});
out.after_tool = t2.output_text;

try {
  await client.responses.create({ model: "no-such-alias", input: "hi" });
  out.unknown = "no error";
} catch (e) {
  out.unknown = { status: e.status, message: e.message };
}
console.log(JSON.stringify(out));
