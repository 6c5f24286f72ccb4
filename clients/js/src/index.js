// wsrelay-client: the official JavaScript client of wsrelay (protocol v1, see
// docs/protocol.md). No runtime dependencies; browsers and Node.js 18+ (pass a
// WebSocket constructor, e.g. from the `ws` package, where there is no global one).
//
// Transports: a WebSocket first; where one cannot open (a proxy that breaks
// upgrades), Server-Sent Events (`EventSource`) or HTTP streaming (`fetch`), with
// requests POSTed to any node — the same frames, the same guarantees.
//
// What it does for you: request ids, acks and timeouts; reconnecting with
// exponential backoff and full jitter (at once after a drain's 1001); subscribing
// again after a reconnect with the last epoch and offset seen, so nothing is lost or
// repeated (or a `gap` event says it could not be recovered); token refresh; a
// heartbeat of its own to notice a dead connection.

export const SUBPROTOCOL = "wsrelay.v1";

/** An error of a request, with the protocol's error code (`forbidden`,
 *  `unavailable`, `rate_limited`, …) or `disconnected` / `timeout`. `refused` is
 *  the application backend's answer (docs/proxy.md): its own code is `appCode`. */
export class RelayError extends Error {
  constructor(code, message, appCode) {
    super(message || code);
    this.name = "RelayError";
    this.code = code;
    /** The backend's code (4000–4999) of a `refused`, else null. */
    this.appCode = appCode ?? null;
  }
}

/** A minimal event emitter: `on` returns a function that removes the listener. */
class Emitter {
  #listeners = new Map();

  on(event, listener) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(listener);
    return () => this.off(event, listener);
  }

  off(event, listener) {
    this.#listeners.get(event)?.delete(listener);
  }

  emit(event, value) {
    for (const listener of [...(this.#listeners.get(event) ?? [])]) {
      try {
        listener(value);
      } catch (e) {
        // A listener's bug must not break the connection's bookkeeping.
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }
}

// Close codes (docs/protocol.md).
const GOING_AWAY = 1001;
const POLICY = 1008;
// The client sent something the relay refuses: retrying cannot help.
const FATAL = new Set([1003, 1007, 1009]);
// The application's backend refused the connection, or ended it (docs/proxy.md):
// 4000–4499 say that reconnecting cannot help, 4500–4999 that it may.
const isFinalAppCode = (code) => code >= 4000 && code <= 4499;
// Closes of our own making.
const CLOSE_NORMAL = 1000;
const CLOSE_DEAD = 4000;

/** One channel subscription of a {@link Relay}. Events: `subscribed`
 *  ({epoch, offset, recovered}), `message` ({data, offset, from}), `gap`
 *  ({epoch, offset}), `join`, `leave`, `unsubscribed`, `error` (a RelayError). */
export class Subscription extends Emitter {
  #relay;

  constructor(relay, channel, since) {
    super();
    this.#relay = relay;
    /** The channel. */
    this.channel = channel;
    /** The history's epoch, on channels with history. */
    this.epoch = since?.epoch ?? null;
    /** The last offset received, on channels with history. */
    this.offset = since?.offset ?? null;
    /** `subscribing`, `subscribed` or `unsubscribed`. */
    this.state = "subscribing";
  }

  /** Publishes to this channel; resolves with `{offset}` (on channels with history). */
  publish(data) {
    return this.#relay.publish(this.channel, data);
  }

  /** Reads the channel's history: `{epoch, offset, messages}`.
   *  @param {{since?: {epoch: string, offset: number}, limit?: number}} [options] */
  history({ since, limit } = {}) {
    const frame = { op: "history", ch: this.channel };
    if (since) frame.since = since;
    if (limit !== undefined) frame.limit = limit;
    return this.#relay.request(frame);
  }

  /** Who is subscribed, on every node: an array of `{conn, node, user, info}`. */
  async presence() {
    return (await this.#relay.request({ op: "presence", ch: this.channel })).clients;
  }

  /** `{clients, users}` of the channel's presence. */
  async presenceStats() {
    const { clients, users } = await this.#relay.request({ op: "presence_stats", ch: this.channel });
    return { clients, users };
  }

  /** Stops the subscription. */
  unsubscribe() {
    return this.#relay.unsubscribe(this.channel);
  }
}


/** The URL of `path` on the node `wsUrl` names (`ws://h/ws` → `http://h/sse`). */
function siblingUrl(wsUrl, path) {
  const url = new URL(wsUrl);
  url.protocol = url.protocol === "wss:" ? "https:" : url.protocol === "ws:" ? "http:" : url.protocol;
  url.pathname = url.pathname.replace(/\/ws\/?$/, "") + path;
  return url;
}

/** The WebSocket transport. `handlers`: `frame(object)`, `closed({code, reason})`. */
class WebSocketTransport {
  constructor(url, token, options, handlers) {
    const target = new URL(url);
    if (token) target.searchParams.set("token", token);
    this.ws = new options.WebSocket(target.toString(), [SUBPROTOCOL]);
    this.ws.onmessage = (ev) => {
      let frame;
      try {
        frame = JSON.parse(typeof ev.data === "string" ? ev.data : String(ev.data));
      } catch {
        return;
      }
      handlers.frame(frame);
    };
    this.ws.onclose = (ev) => handlers.closed({ code: ev.code, reason: ev.reason });
    this.ws.onerror = () => {};
  }

  send(text) {
    try {
      this.ws.send(text);
    } catch {
      // The close event follows.
    }
  }

  close(code, reason) {
    this.ws.onclose = null;
    this.ws.onmessage = null;
    try {
      this.ws.close(code, reason);
    } catch {
      // Already closed.
    }
  }
}

/** A streaming transport: frames come on one long response (SSE through
 *  `EventSource`, or newline-delimited JSON through `fetch`), requests go out as
 *  POSTs to any node with the session id from `welcome`, one at a time, in order.
 *  The stream's own `close` frame ends it with the code a WebSocket would have. */
class StreamTransport {
  #handlers;
  #options;
  #requestUrl;
  #session = null;
  #outbox = [];
  #sending = false;
  #done = false;
  #abort = new AbortController();
  #source = null;

  constructor(kind, url, token, options, handlers) {
    this.#handlers = handlers;
    this.#options = options;
    this.#requestUrl = siblingUrl(url, "/stream/request");
    const target = siblingUrl(url, kind === "sse" ? "/sse" : "/stream");
    if (token) target.searchParams.set("token", token);
    if (kind === "sse") this.#openSse(target);
    else this.#openFetch(target);
  }

  #openSse(target) {
    const source = new this.#options.EventSource(target.toString());
    this.#source = source;
    source.onmessage = (ev) => this.#text(ev.data);
    // `EventSource` would reconnect by itself; the relay client reconnects with
    // what it knows (subscriptions, offsets), so the source is closed instead.
    source.onerror = () => this.#end({ code: 1006, reason: "event stream failed" });
  }

  async #openFetch(target) {
    let response;
    try {
      response = await this.#options.fetch(target.toString(), { method: "POST", signal: this.#abort.signal });
    } catch (e) {
      return this.#end({ code: 1006, reason: `stream could not open: ${e?.cause?.message ?? e?.message ?? e}` });
    }
    if (!response.ok || !response.body) {
      return this.#end({ code: response.status === 401 ? POLICY : 1006, reason: `HTTP ${response.status}` });
    }
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let newline;
        while ((newline = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, newline);
          buffer = buffer.slice(newline + 1);
          // An empty line is a heartbeat.
          if (line.length > 0) this.#text(line);
        }
      }
    } catch {
      // Aborted, or the connection broke.
    }
    this.#end({ code: 1006, reason: "stream ended" });
  }

  #text(text) {
    if (this.#done) return;
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (frame.op === "welcome") {
      this.#session = frame.session ?? null;
      this.#pump();
    }
    if (frame.op === "close") {
      return this.#end({ code: frame.code, reason: frame.reason });
    }
    this.#handlers.frame(frame);
  }

  send(text) {
    this.#outbox.push(text);
    this.#pump();
  }

  async #pump() {
    if (this.#sending || this.#session === null) return;
    this.#sending = true;
    while (this.#outbox.length > 0 && !this.#done) {
      const body = this.#outbox[0];
      let status;
      try {
        const url = new URL(this.#requestUrl);
        url.searchParams.set("session", this.#session);
        const response = await this.#options.fetch(url.toString(), {
          method: "POST",
          // text/plain: a "simple" request, which a page of another (allowed)
          // origin sends without a CORS preflight.
          headers: { "Content-Type": "text/plain;charset=UTF-8" },
          body,
        });
        status = response.status;
      } catch {
        status = 0;
      }
      if (status === 429) {
        // The session has enough requests waiting: send this one a little later.
        await new Promise((r) => setTimeout(r, 50));
        continue;
      }
      this.#outbox.shift();
      if (status === 404 || status === 0) {
        // No node holds the session any more: the stream is gone too.
        this.#end({ code: 1006, reason: "session lost" });
      }
      // Other refusals (400, 413) fail only that request: its timeout tells.
    }
    this.#sending = false;
  }

  #end(event) {
    if (this.#done) return;
    this.#done = true;
    this.close();
    this.#handlers.closed(event);
  }

  close() {
    this.#done = true;
    this.#abort.abort();
    this.#source?.close();
  }
}

/** Which transports can run here, of those asked for. */
function availableTransports(options) {
  return options.transports.filter((name) =>
    name === "websocket" ? typeof options.WebSocket === "function"
      : name === "sse" ? typeof options.EventSource === "function" && typeof options.fetch === "function"
        : name === "stream" ? typeof options.fetch === "function"
          : false,
  );
}

/** A connection to wsrelay that reconnects by itself. Events: `connecting`,
 *  `connected` ({node, conn}), `disconnected` ({code, reason, reconnect}), `error`. */
export class Relay extends Emitter {
  #url;
  #options;
  #ws = null;
  #transports;
  #transport = 0;
  #welcomed = false;
  #triedThisRound = 0;
  #state = "disconnected";
  #wanted = false;
  #attempt = 0;
  #retryTimer = null;
  #heartbeatTimer = null;
  #lastFrameAt = 0;
  #pingSent = false;
  #nextId = 1;
  #pending = new Map();
  #subs = new Map();
  #token = null;

  /**
   * @param {string} url `ws://host:port/ws` or `wss://…`
   * @param {object} [options]
   */
  constructor(url, options = {}) {
    super();
    this.#url = url;
    this.#options = {
      token: null,
      getToken: null,
      WebSocket: globalThis.WebSocket,
      minReconnectDelay: 500,
      maxReconnectDelay: 20000,
      requestTimeout: 10000,
      // The relay pings every 25 s by default; a client that has heard nothing for
      // this long sends a ping of its own, and gives up on the connection after
      // `pingTimeout` more.
      pingInterval: 25000,
      pingTimeout: 10000,
      // Tried in this order; a transport that cannot open passes to the next.
      transports: ["websocket", "sse", "stream"],
      EventSource: globalThis.EventSource,
      fetch: globalThis.fetch?.bind(globalThis),
      ...options,
    };
    this.#transports = availableTransports(this.#options);
    if (this.#transports.length === 0) {
      throw new TypeError("no transport here: pass a WebSocket, e.g. new Relay(url, { WebSocket: (await import('ws')).WebSocket })");
    }
    this.#token = this.#options.token;
    /** The node serving the connection, once connected. */
    this.node = null;
  }

  /** `disconnected`, `connecting` or `connected`. */
  get state() {
    return this.#state;
  }

  /** The transport in use or being tried: `websocket`, `sse` or `stream`. */
  get transport() {
    return this.#transports[this.#transport];
  }

  /** Connects (and keeps reconnecting until {@link disconnect}). */
  connect() {
    if (this.#wanted) return;
    this.#wanted = true;
    this.#open();
  }

  /** Closes the connection and stops reconnecting. */
  disconnect() {
    this.#wanted = false;
    clearTimeout(this.#retryTimer);
    const ws = this.#ws;
    this.#ws = null;
    if (ws) {
      this.#closed({ code: CLOSE_NORMAL, reason: "disconnect()" }, false);
      ws.close(CLOSE_NORMAL, "disconnect()");
    }
  }

  /** Subscribes to `channel` (again after every reconnect, recovering what was
   *  missed); `since` ({epoch, offset}) recovers from a position known before.
   *  @param {string} channel
   *  @param {{since?: {epoch: string, offset: number}}} [options] */
  subscribe(channel, { since } = {}) {
    let sub = this.#subs.get(channel);
    if (sub && sub.state !== "unsubscribed") return sub;
    sub = new Subscription(this, channel, since);
    this.#subs.set(channel, sub);
    if (this.#state === "connected") this.#sendSubscribe(sub);
    return sub;
  }

  /** Stops a subscription. */
  async unsubscribe(channel) {
    const sub = this.#subs.get(channel);
    if (!sub) return;
    this.#subs.delete(channel);
    sub.state = "unsubscribed";
    sub.emit("unsubscribed", {});
    if (this.#state === "connected") {
      await this.request({ op: "unsub", ch: channel }).catch(() => {});
    }
  }

  /** Publishes `data` to `channel`; resolves with `{offset}` once the relay accepted
   *  it. Rejects with a RelayError: the relay's code, or `disconnected` if the
   *  connection dropped first (the message may or may not have gone out: retry
   *  only if a duplicate is acceptable). */
  async publish(channel, data) {
    const ack = await this.request({ op: "pub", ch: channel, data });
    return { offset: ack.offset ?? null };
  }

  /** Calls `method` of the application's backend through the relay (its rpc
   *  proxy): resolves with the answer's `data`. Rejects with a RelayError:
   *  `refused` with the backend's `appCode`, `unavailable` when it did not answer,
   *  `disconnected`, `timeout`, …
   *  @param {string} method
   *  @param {unknown} [data] any JSON value (default null) */
  async rpc(method, data = null) {
    const reply = await this.request({ op: "rpc", method, data });
    return reply.data;
  }

  /** Sends a request and resolves with its reply (an `ack` or the op's own reply). */
  request(frame) {
    if (this.#state !== "connected") {
      return Promise.reject(new RelayError("disconnected", "not connected"));
    }
    const id = this.#nextId++;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#pending.delete(id);
        reject(new RelayError("timeout", `no reply to ${frame.op} within ${this.#options.requestTimeout} ms`));
      }, this.#options.requestTimeout);
      this.#pending.set(id, { resolve, reject, timer });
      this.#send({ ...frame, id });
    });
  }

  async #open() {
    if (!this.#wanted) return;
    this.#state = "connecting";
    this.emit("connecting", {});
    if (this.#options.getToken && (this.#token === null || this.#needsToken)) {
      try {
        this.#token = await this.#options.getToken();
        this.#needsToken = false;
      } catch (e) {
        this.emit("error", new RelayError("token", `getToken failed: ${e?.message ?? e}`));
        return this.#retry(false);
      }
    }
    if (!this.#wanted) return;
    const name = this.#transports[this.#transport];
    this.#welcomed = false;
    let ws;
    const handlers = {
      frame: (frame) => {
        if (this.#ws !== ws) return;
        this.#lastFrameAt = Date.now();
        this.#pingSent = false;
        this.handleFrame(frame);
      },
      closed: ({ code, reason }) => {
        if (this.#ws !== ws) return;
        this.#ws = null;
        this.#closed({ code, reason }, true);
      },
    };
    try {
      ws = name === "websocket"
        ? new WebSocketTransport(this.#url, this.#token, this.#options, handlers)
        : new StreamTransport(name, this.#url, this.#token, this.#options, handlers);
    } catch (e) {
      this.emit("error", new RelayError("connect", e?.message ?? String(e)));
      return this.#retry(false);
    }
    this.#ws = ws;
  }

  #needsToken = false;
  /** Channels the server subscribed this connection to (not through `subscribe`). */
  #serverChannels = new Set();
  /** The reason of a `disconnect` frame, for the close that follows it. */
  #serverReason = null;

  /** Handles one frame from the relay (exported for tests of the wire format). */
  handleFrame(frame) {
    switch (frame.op) {
      case "welcome":
        this.#state = "connected";
        this.#welcomed = true;
        this.#triedThisRound = 0;
        this.#attempt = 0;
        this.node = frame.node;
        this.#lastFrameAt = Date.now();
        this.#startHeartbeat();
        // Channels of `welcome` the page did not ask for: the server's (a token's
        // or the backend's `subscribe`, the personal channel).
        this.#serverChannels = new Set((frame.channels ?? []).filter((c) => !this.#subs.has(c)));
        this.emit("connected", { node: frame.node, conn: frame.conn, transport: this.transport, channels: [...this.#serverChannels] });
        for (const sub of this.#subs.values()) this.#sendSubscribe(sub);
        return;
      case "msg": {
        const sub = this.#subs.get(frame.ch);
        if (!sub) {
          // A channel the server subscribed this connection to (at connect, or
          // through the server API): its messages go to the relay's `message`.
          if (this.#serverChannels.has(frame.ch)) {
            this.emit("message", { channel: frame.ch, data: frame.data, offset: frame.offset ?? null, from: frame.from ?? null });
          }
          return;
        }
        if (sub.state === "unsubscribed") return;
        if (typeof frame.offset === "number") {
          // Delivered offsets only grow; an older one is a duplicate.
          if (sub.offset !== null && frame.offset <= sub.offset) return;
          sub.offset = frame.offset;
        }
        sub.emit("message", { data: frame.data, offset: frame.offset ?? null, from: frame.from ?? null });
        return;
      }
      case "gap": {
        const sub = this.#subs.get(frame.ch);
        if (!sub) return;
        sub.epoch = frame.epoch;
        sub.offset = frame.offset;
        sub.emit("gap", { epoch: frame.epoch, offset: frame.offset });
        return;
      }
      case "join":
      case "leave": {
        const sub = this.#subs.get(frame.ch);
        if (!sub) return;
        const { conn, node, user, info } = frame;
        sub.emit(frame.op, { conn, node, user, info });
        return;
      }
      case "subscribed":
        // The server subscribed this connection (POST /api/subscribe).
        if (!this.#subs.has(frame.ch)) this.#serverChannels.add(frame.ch);
        this.emit("subscribed", { channel: frame.ch, epoch: frame.epoch ?? null, offset: frame.offset ?? null });
        return;
      case "unsubscribed": {
        this.#serverChannels.delete(frame.ch);
        const sub = this.#subs.get(frame.ch);
        if (sub) {
          this.#subs.delete(frame.ch);
          sub.state = "unsubscribed";
          sub.emit("unsubscribed", {});
        }
        this.emit("unsubscribed", { channel: frame.ch });
        return;
      }
      case "disconnect":
        // The close follows with the same code; its reason is the server's words.
        this.#serverReason = frame.reason ?? null;
        return;
      case "error": {
        const pending = this.#pending.get(frame.id);
        const error = new RelayError(frame.code, frame.message, frame.app_code);
        if (pending) {
          this.#pending.delete(frame.id);
          clearTimeout(pending.timer);
          pending.reject(error);
        } else {
          this.emit("error", error);
        }
        return;
      }
      default: {
        // `ack`, `history`, `presence`, `presence_stats`, `rpc`, `pong`: replies.
        const pending = this.#pending.get(frame.id);
        if (pending) {
          this.#pending.delete(frame.id);
          clearTimeout(pending.timer);
          pending.resolve(frame);
        }
      }
    }
  }

  #sendSubscribe(sub) {
    const frame = { op: "sub", ch: sub.channel };
    if (sub.epoch !== null && sub.offset !== null) {
      frame.since = { epoch: sub.epoch, offset: sub.offset };
    }
    sub.state = "subscribing";
    this.request(frame).then(
      (ack) => {
        if (this.#subs.get(sub.channel) !== sub) return;
        sub.state = "subscribed";
        if (typeof ack.offset === "number") {
          if (ack.recovered === false) {
            sub.epoch = ack.epoch;
            sub.offset = ack.offset;
            sub.emit("gap", { epoch: ack.epoch, offset: ack.offset });
          } else {
            sub.epoch = ack.epoch;
            // Replayed messages came before the ack and moved the offset already.
            sub.offset = Math.max(sub.offset ?? 0, ack.offset);
          }
        }
        sub.emit("subscribed", { epoch: ack.epoch ?? null, offset: ack.offset ?? null, recovered: ack.recovered ?? null });
      },
      (error) => {
        if (error.code === "disconnected" || this.#subs.get(sub.channel) !== sub) return;
        sub.emit("error", error);
      },
    );
  }

  #send(frame) {
    this.#ws?.send(JSON.stringify(frame));
  }

  #startHeartbeat() {
    clearInterval(this.#heartbeatTimer);
    const { pingInterval, pingTimeout } = this.#options;
    const every = Math.max(100, Math.min(pingInterval, pingTimeout) / 2);
    this.#heartbeatTimer = setInterval(() => {
      const quiet = Date.now() - this.#lastFrameAt;
      if (quiet > pingInterval + pingTimeout) {
        // Half-open: nothing at all, not even an answer to our ping.
        const ws = this.#ws;
        this.#ws = null;
        this.#closed({ code: CLOSE_DEAD, reason: "no answer to ping" }, true, true);
        ws?.close(CLOSE_DEAD, "no answer to ping");
      } else if (quiet > pingInterval && !this.#pingSent) {
        this.#pingSent = true;
        this.#send({ op: "ping" });
      }
    }, every);
  }

  /** The connection ended: fail what was pending, tell, and reconnect if it helps.
   *  `ours`: the client closed it itself (its code is not the relay's). */
  #closed({ code, reason }, fromSocket, ours = false) {
    clearInterval(this.#heartbeatTimer);
    if (this.#serverReason !== null) {
      reason = this.#serverReason;
      this.#serverReason = null;
    }
    this.#state = "disconnected";
    this.node = null;
    for (const { reject, timer } of this.#pending.values()) {
      clearTimeout(timer);
      reject(new RelayError("disconnected", `connection closed (${code})`));
    }
    this.#pending.clear();
    for (const sub of this.#subs.values()) sub.state = "subscribing";
    let reconnect = this.#wanted && fromSocket;
    if (FATAL.has(code) || (!ours && isFinalAppCode(code))) reconnect = false;
    if (code === POLICY) {
      // An expired token (or abuse): only a fresh token can help.
      if (this.#options.getToken) this.#needsToken = true;
      else reconnect = false;
    }
    this.emit("disconnected", { code, reason, reconnect, transport: this.transport });
    if (!reconnect) {
      if (fromSocket) this.#wanted = false;
      return;
    }
    if (!this.#welcomed && this.#transports.length > 1) {
      // This transport could not even open: try the next one at once, and back
      // off only when every one failed in a row.
      this.#transport = (this.#transport + 1) % this.#transports.length;
      this.#triedThisRound++;
      if (this.#triedThisRound < this.#transports.length) return this.#retry(true);
      this.#triedThisRound = 0;
    }
    this.#retry(code === GOING_AWAY);
  }

  /** Schedules the next connect: at once after a drain (another node takes over),
   *  otherwise after a full-jitter exponential backoff. */
  #retry(now) {
    if (!this.#wanted) return;
    clearTimeout(this.#retryTimer);
    const { minReconnectDelay, maxReconnectDelay } = this.#options;
    const cap = Math.min(maxReconnectDelay, minReconnectDelay * 2 ** this.#attempt);
    this.#attempt++;
    const delay = now ? 0 : Math.random() * cap;
    this.#retryTimer = setTimeout(() => this.#open(), delay);
  }
}
