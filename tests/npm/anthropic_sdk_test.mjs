// The official Anthropic SDK through `factory serve`'s Messages endpoint: a message,
// a streamed message (the SDK's own event accumulation) and a tool call (answered,
// then continued with the tool's result), plus the error an unknown model gets.
// Usage: node anthropic_sdk_test.mjs BASE_URL API_KEY MODEL
// Prints one JSON line with what the SDK saw; exits 1 on any unexpected failure.
import Anthropic from "@anthropic-ai/sdk";

const [base, apiKey, model] = process.argv.slice(2);
const client = new Anthropic({ baseURL: base, apiKey, maxRetries: 0, timeout: 20000 });
const out = {};
const ask = [{ role: "user", content: "Say hello" }];

const msg = await client.messages.create({ model, max_tokens: 100, messages: ask });
out.chat = msg.content[0].text;
out.usage = msg.usage;

const stream = client.messages.stream({ model, max_tokens: 100, messages: ask });
let text = "";
stream.on("text", (t) => { text += t; });
const final = await stream.finalMessage();
out.stream = text;
out.stream_final = { text: final.content[0].text, stop: final.stop_reason, output_tokens: final.usage.output_tokens };

const tools = [{
  name: "get_weather", description: "The weather in a city",
  input_schema: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
}];
const question = [{ role: "user", content: "Weather in Paris?" }];
const t = await client.messages.create({ model, max_tokens: 100, system: "Use tools.", messages: question, tools });
const use = t.content.find((b) => b.type === "tool_use");
out.tool = { name: use.name, args: use.input, stop: t.stop_reason };
const t2 = await client.messages.create({
  model, max_tokens: 100, system: "Use tools.", tools,
  messages: [...question, { role: "assistant", content: t.content },
             { role: "user", content: [{ type: "tool_result", tool_use_id: use.id, content: "sunny" }] }],
});
out.after_tool = t2.content[0].text;

try {
  await client.messages.create({ model: "no-such-alias", max_tokens: 10, messages: ask });
  out.unknown = "no error";
} catch (e) {
  out.unknown = { status: e.status, type: e.error?.error?.type, message: e.message };
}
console.log(JSON.stringify(out));
