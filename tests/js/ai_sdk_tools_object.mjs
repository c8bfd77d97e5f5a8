// The Vercel AI SDK's generateText with a tool and Output.object in one request, against
// the kvformer server whose address is the first argument; the tool is offered in the first
// step only (so that a random model ends). Prints each seed's object and tool calls as JSON.
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateText, Output, stepCountIs, tool } from "ai";
import { z } from "zod";

const provider = createOpenAICompatible({
  name: "kvformer", baseURL: process.argv[2] + "/v1", apiKey: "unused",
  supportsStructuredOutputs: true,
});
const results = [];
for (const seed of [0, 1, 2, 3]) {
  const calls = [];
  const run = await generateText({
    model: provider("tiny"),
    prompt: "Who is Ada?",
    tools: {
      get_weather: tool({
        description: "The weather in a city",
        inputSchema: z.object({ city: z.string().max(12), unit: z.enum(["c", "f"]) }),
        execute: async ({ city }) => { calls.push(city); return "21 degrees, sunny"; },
      }),
    },
    output: Output.object({
      schema: z.object({ name: z.string().max(10), age: z.number().int().min(0).max(99) }),
    }),
    prepareStep: ({ stepNumber }) => (stepNumber > 0 ? { activeTools: [] } : {}),
    stopWhen: stepCountIs(3),
    temperature: 1, seed, maxOutputTokens: 200, maxRetries: 0,
    providerOptions: { kvformer: { parallel_tool_calls: false } },
  });
  results.push({ output: run.output, calls: calls.length, steps: run.steps.length });
}
console.log(JSON.stringify(results));
