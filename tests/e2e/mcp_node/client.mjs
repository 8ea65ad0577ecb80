// The official TypeScript MCP client (@modelcontextprotocol/sdk) against hutch, driven by
// tests/e2e/test_mcp.py. Usage: node client.mjs SCENARIO URL [SESSION_ID]; the key is HUTCH_API_KEY.
// Prints one JSON line: what the scenario saw.
//   streamable  connect over Streamable HTTP, count twice, read the log, end the session (DELETE)
//   sse         the same over HTTP+SSE; closing ends the session
//   open        connect over Streamable HTTP, count once, leave without ending the session
//   resume      come back to SESSION_ID (no initialize) and count: the error, if any
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { SSEClientTransport } from "@modelcontextprotocol/sdk/client/sse.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [scenario, url, sessionId] = process.argv.slice(2);
const requestInit = { headers: { "X-API-Key": process.env.HUTCH_API_KEY } };

function structured(result) {
  if (result.isError) throw new Error(`tool error: ${JSON.stringify(result.content)}`);
  return result.structuredContent ?? JSON.parse(result.content[0].text);
}

async function countTwice(client) {
  const first = structured(await client.callTool({ name: "increment", arguments: { by: 5 } }));
  const second = structured(await client.callTool({ name: "increment", arguments: { by: 5 } }));
  const log = await client.callTool({ name: "read_log", arguments: {} });
  return { counts: [first.count, second.count], instances: [first.instance, second.instance], log: log.content[0].text };
}

async function main() {
  const client = new Client({ name: "hutch-e2e-ts", version: "1.0.0" });
  if (scenario === "streamable") {
    const transport = new StreamableHTTPClientTransport(new URL(url), { requestInit });
    await client.connect(transport);
    const seen = await countTwice(client);
    const session = transport.sessionId;
    await transport.terminateSession();
    await client.close();
    return { ...seen, sessionId: session, protocolVersion: transport.protocolVersion };
  }
  if (scenario === "sse") {
    const transport = new SSEClientTransport(new URL(url), { requestInit });
    await client.connect(transport);
    const seen = await countTwice(client);
    await client.close();
    return seen;
  }
  if (scenario === "open") {
    const transport = new StreamableHTTPClientTransport(new URL(url), { requestInit });
    await client.connect(transport);
    const first = structured(await client.callTool({ name: "increment", arguments: { by: 1 } }));
    const session = transport.sessionId;
    await transport.close(); // no DELETE: the session stays until hutch reclaims it
    return { count: first.count, sessionId: session };
  }
  if (scenario === "resume") {
    const transport = new StreamableHTTPClientTransport(new URL(url), { requestInit, sessionId });
    await client.connect(transport); // a transport with a session id skips initialize
    try {
      const result = await client.callTool({ name: "increment", arguments: { by: 1 } });
      return { ok: true, result };
    } catch (error) {
      return { ok: false, code: error.code ?? null, message: String(error.message ?? error) };
    } finally {
      await transport.close();
    }
  }
  throw new Error(`unknown scenario ${scenario}`);
}

main().then(
  (out) => {
    console.log(JSON.stringify(out));
    process.exit(0);
  },
  (error) => {
    console.log(JSON.stringify({ error: String(error?.stack ?? error) }));
    process.exit(1);
  },
);
