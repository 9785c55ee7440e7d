// Sends GenAI spans to OTLP_URL with the official OTLP/HTTP exporter (JSON, as the exporter
// defaults), then prints one line of JSON: {"code": <ExportResultCode>, "error": ...}.
// Usage: OTLP_URL=http://127.0.0.1:8000/v1/traces OTLP_KEY=llmo_... SERVICE=x COUNT=3 node send.mjs
import { OTLPTraceExporter } from "@opentelemetry/exporter-trace-otlp-http";
import { BasicTracerProvider, SimpleSpanProcessor } from "@opentelemetry/sdk-trace-base";
import { resourceFromAttributes } from "@opentelemetry/resources";
import { SpanKind } from "@opentelemetry/api";

const exporter = new OTLPTraceExporter({
  url: process.env.OTLP_URL,
  headers: { Authorization: `Bearer ${process.env.OTLP_KEY}` },
  compression: process.env.GZIP === "1" ? "gzip" : "none",
});
const results = [];
const recording = {
  export(spans, done) {
    exporter.export(spans, (result) => { results.push(result); done(result); });
  },
  shutdown() { return exporter.shutdown(); },
  forceFlush() { return exporter.forceFlush(); },
};
const provider = new BasicTracerProvider({
  resource: resourceFromAttributes({ "service.name": process.env.SERVICE }),
  spanProcessors: [new SimpleSpanProcessor(recording)],
});
const tracer = provider.getTracer("node-interop");
const count = Number(process.env.COUNT || "3");
for (let i = 0; i < count; i++) {
  const span = tracer.startSpan("chat gpt-4o-mini", { kind: SpanKind.CLIENT });
  span.setAttribute("gen_ai.operation.name", "chat");
  span.setAttribute("gen_ai.provider.name", "openai");
  span.setAttribute("gen_ai.request.model", "gpt-4o-mini");
  span.setAttribute("gen_ai.usage.input_tokens", 23);
  span.setAttribute("gen_ai.usage.output_tokens", 17);
  span.setAttribute("gen_ai.input.messages", JSON.stringify([{ role: "user", parts: [{ type: "text", content: `node prompt ${i}` }] }]));
  span.end();
}
await provider.forceFlush();
await provider.shutdown();
const failed = results.filter((r) => r.code !== 0);
console.log(JSON.stringify({ exports: results.length, failed: failed.length, error: failed[0]?.error?.message ?? null }));
process.exit(failed.length ? 1 : 0);
