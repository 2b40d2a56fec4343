// The official openai SDK through `factory serve`: a chat, a streamed chat and a
// tool call (answered, then continued with the tool's result), plus the error an
// unknown model gets. Usage: node sdk_test.mjs BASE_URL API_KEY MODEL
// Prints one JSON line with what the SDK saw; exits 1 on any unexpected failure.
import OpenAI from "openai";

const [base, apiKey, model] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey, maxRetries: 0, timeout: 20000 });
const out = {};
const ask = [{ role: "user", content: "Say hello" }];

const chat = await client.chat.completions.create({ model, messages: ask });
out.chat = chat.choices[0].message.content;
out.usage = chat.usage;

const stream = await client.chat.completions.create({
  model, messages: ask, stream: true, stream_options: { include_usage: true },
});
out.stream = "";
for await (const chunk of stream) {
  out.stream += chunk.choices[0]?.delta?.content ?? "";
  if (chunk.usage) out.stream_usage = chunk.usage;
}

const tools = [{
  type: "function",
  function: {
    name: "get_weather", description: "The weather in a city",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
}];
const question = [{ role: "system", content: "Use tools." }, { role: "user", content: "Weather in Paris?" }];
const t = await client.chat.completions.create({ model, messages: question, tools });
const call = t.choices[0].message.tool_calls[0];
out.tool = { name: call.function.name, args: JSON.parse(call.function.arguments), finish: t.choices[0].finish_reason };
const t2 = await client.chat.completions.create({
  model, tools,
  messages: [...question, t.choices[0].message, { role: "tool", tool_call_id: call.id, content: "sunny" }],
});
out.after_tool = t2.choices[0].message.content;

try {
  await client.chat.completions.create({ model: "no-such-alias", messages: ask });
  out.unknown = "no error";
} catch (e) {
  out.unknown = { status: e.status, type: e.type, message: e.message };
}
console.log(JSON.stringify(out));
