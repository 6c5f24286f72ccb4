// Type-checked only (`npm run typecheck`): the README's example compiles against
// the declarations, so the two cannot drift apart.
import { Relay, RelayError, type Position } from "../src/index.js";

declare const WebSocketImpl: unknown;

async function example(): Promise<void> {
  const relay = new Relay("wss://relay.example.com/ws", {
    getToken: async () => "jwt",
    WebSocket: WebSocketImpl,
  });
  relay.on("connected", ({ node }) => console.log(`on node ${node}`));
  relay.on("disconnected", ({ code, reconnect }) => console.log(code, reconnect));
  relay.connect();

  const saved: Position | undefined = { epoch: "k3x9", offset: 40 };
  const room = relay.subscribe("chat:1", { since: saved });
  room.on("message", ({ data, offset }) => console.log(offset, data));
  room.on("subscribed", ({ recovered }) => console.log(recovered));
  room.on("gap", ({ epoch, offset }) => console.log("reload state", epoch, offset));
  room.on("join", ({ user, node }) => console.log(user, node));

  try {
    const { offset } = await room.publish({ text: "hi" });
    console.log(offset);
  } catch (e) {
    if (e instanceof RelayError && e.code === "rate_limited") console.log("slow down");
  }
  const history = await room.history({ limit: 50 });
  const last: number = history.offset;
  const people = await room.presence();
  try {
    const lines = await relay.rpc<{ lines: unknown[] }>("history", { room: "chat:1" });
    console.log(lines.lines.length);
  } catch (e) {
    if (e instanceof RelayError && e.code === "refused") console.log(e.appCode, e.message);
  }
  const { clients, users } = await room.presenceStats();
  console.log(last, people.length, clients, users);
  await room.unsubscribe();
  relay.disconnect();
}

void example;
