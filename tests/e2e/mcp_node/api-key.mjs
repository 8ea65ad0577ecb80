// Preloaded with `node --import`: every HTTP request this process makes (global fetch, and undici's
// own `request`, both through undici's global dispatcher) carries hutch's API key, which tools such
// as the MCP conformance suite have no option for.
import { Agent, setGlobalDispatcher } from "undici";

const key = process.env.HUTCH_API_KEY;

function withKey(headers) {
  if (headers == null) return { "x-api-key": key };
  if (Array.isArray(headers)) return [...headers, "x-api-key", key];
  if (typeof headers[Symbol.iterator] === "function") return [...Array.from(headers).flat(), "x-api-key", key];
  return { ...headers, "x-api-key": key };
}

if (key) {
  setGlobalDispatcher(
    new Agent().compose((dispatch) => (options, handler) => dispatch({ ...options, headers: withKey(options.headers) }, handler)),
  );
}
