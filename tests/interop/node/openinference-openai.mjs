// @arizeai/openinference-instrumentation-openai + the openai npm package against the fake provider, exported with
// @opentelemetry/exporter-trace-otlp-http (OTLP JSON, the exporter's default) to the appliance.
// Env: APPLIANCE_URL, API_KEY, FAKE_OPENAI_URL (ends in /v1), SERVICE_NAME. Prints one JSON line per call.
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { BasicTracerProvider, BatchSpanProcessor } from "@opentelemetry/sdk-trace-base";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { OpenAIInstrumentation } from "@arizeai/openinference-instrumentation-openai";
import OpenAI from "openai";

const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({ "service.name": process.env.SERVICE_NAME || "interop-matrix-node" }),
  spanProcessors: [new BatchSpanProcessor(new OTLPTraceExporter({
    url: `${process.env.APPLIANCE_URL}/v1/traces`,
    headers: { Authorization: `Bearer ${process.env.API_KEY}` },
  }))],
});
const instrumentation = new OpenAIInstrumentation();
instrumentation.setTracerProvider(provider);
instrumentation.manuallyInstrument(OpenAI); // ESM: the module is not patched on import

const client = new OpenAI({ baseURL: process.env.FAKE_OPENAI_URL, apiKey: "sk-fake", maxRetries: 0 });
const SYSTEM = "You are a terse assistant.";
const messages = (q) => [{ role: "system", content: SYSTEM }, { role: "user", content: q }];

async function call(label, fn, expected) {
  const out = { call: label };
  try {
    const result = await fn();
    Object.assign(out, { ok: true, result: String(result).slice(0, 200) });
  } catch (err) {
    Object.assign(out, { ok: false, error: err?.constructor?.name });
    if (!(expected && err instanceof expected)) { out.unexpected = true; console.error(err); }
  }
  console.log(JSON.stringify(out));
}

await call("plain", async () => (await client.chat.completions.create({
  model: "gpt-4o-mini", messages: messages("Say hello (plain call)") })).choices[0].message.content);
await call("stream", async () => {
  const stream = await client.chat.completions.create({
    model: "gpt-4o-mini", messages: messages("Say hello (streamed call)"), stream: true });
  let text = "";
  for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
  return text;
});
await call("error", () => client.chat.completions.create({
  model: "gpt-4o-mini-error-400", messages: messages("Say hello (failing call)") }), OpenAI.BadRequestError);
await provider.forceFlush();
await provider.shutdown();
