// Types of wsrelay-client (src/index.js).

/** The WebSocket subprotocol the client asks for: `wsrelay.v1`. */
export const SUBPROTOCOL: string;

/** An error of a request: the relay's code (`bad_request`, `invalid_channel`,
 *  `forbidden`, `rate_limited`, `limit_exceeded`, `unavailable`, `not_durable`
 *  (a publish stored and delivered but not confirmed by the replicas), `refused`
 *  (by the application's backend), …) or `disconnected` / `timeout` / `token` /
 *  `connect`. */
export class RelayError extends Error {
  readonly code: string;
  /** The backend's own code (4000–4999) of a `refused`, else null. */
  readonly appCode: number | null;
  constructor(code: string, message?: string, appCode?: number | null);
}

/** A position in a channel's history. */
export interface Position {
  epoch: string;
  offset: number;
}

export interface PresenceEntry {
  conn: string;
  node: string;
  user: string | null;
  info: Record<string, unknown> | null;
}

export interface HistoryReply {
  ch: string;
  epoch: string;
  offset: number;
  messages: { offset: number; from?: string; data: unknown }[];
}

interface SubscriptionEvents {
  subscribed: { epoch: string | null; offset: number | null; recovered: boolean | null };
  message: { data: unknown; offset: number | null; from: string | null };
  gap: Position;
  join: PresenceEntry;
  leave: PresenceEntry;
  unsubscribed: Record<string, never>;
  error: RelayError;
}

/** How frames travel: a WebSocket, Server-Sent Events, or HTTP streaming. */
export type Transport = "websocket" | "sse" | "stream";

interface RelayEvents {
  connecting: Record<string, never>;
  /** `channels`: those the server subscribed the connection to at connect. */
  connected: { node: string; conn: string; transport: Transport; channels: string[] };
  /** A message of a channel the server subscribed the connection to. */
  message: { channel: string; data: unknown; offset: number | null; from: string | null };
  /** The server subscribed the connection to a channel (POST /api/subscribe). */
  subscribed: { channel: string; epoch: string | null; offset: number | null };
  /** The server ended a subscription (POST /api/unsubscribe). */
  unsubscribed: { channel: string };
  disconnected: { code: number; reason: string; reconnect: boolean; transport: Transport };
  error: RelayError;
}

declare class Emitter<E> {
  /** Adds a listener; returns a function that removes it. */
  on<K extends keyof E>(event: K, listener: (value: E[K]) => void): () => void;
  off<K extends keyof E>(event: K, listener: (value: E[K]) => void): void;
}

export class Subscription extends Emitter<SubscriptionEvents> {
  readonly channel: string;
  /** The history's epoch (channels with history). */
  epoch: string | null;
  /** The last offset received (channels with history). */
  offset: number | null;
  state: "subscribing" | "subscribed" | "unsubscribed";
  publish(data: unknown): Promise<{ offset: number | null }>;
  history(options?: { since?: Position; limit?: number }): Promise<HistoryReply>;
  presence(): Promise<PresenceEntry[]>;
  presenceStats(): Promise<{ clients: number; users: number }>;
  unsubscribe(): Promise<void>;
}

export interface RelayOptions {
  /** A JWT, sent as `?token=`. */
  token?: string | null;
  /** Called before connecting and after the token expired (close 1008). */
  getToken?: (() => string | Promise<string>) | null;
  /** A WebSocket constructor where there is no global one (e.g. `ws` in Node.js). */
  WebSocket?: unknown;
  /** The transports to try, in order (those that cannot run here are skipped);
   *  one that cannot open passes to the next. Default: all three. */
  transports?: Transport[];
  /** An `EventSource` constructor (for `sse`) where there is no global one. */
  EventSource?: unknown;
  /** A `fetch` (for `sse` requests and `stream`) where there is no global one. */
  fetch?: unknown;
  /** Reconnect backoff: full jitter between 0 and min × 2^attempt, capped (ms). */
  minReconnectDelay?: number;
  maxReconnectDelay?: number;
  /** A request without a reply after this long rejects with `timeout` (ms). */
  requestTimeout?: number;
  /** Silence after which the client pings, and the wait for any answer (ms). */
  pingInterval?: number;
  pingTimeout?: number;
}

export class Relay extends Emitter<RelayEvents> {
  constructor(url: string, options?: RelayOptions);
  readonly state: "disconnected" | "connecting" | "connected";
  /** The transport in use, or being tried. */
  readonly transport: Transport;
  /** The node serving the connection, once connected. */
  node: string | null;
  connect(): void;
  disconnect(): void;
  subscribe(channel: string, options?: { since?: Position }): Subscription;
  unsubscribe(channel: string): Promise<void>;
  publish(channel: string, data: unknown): Promise<{ offset: number | null }>;
  /** Calls a method of the application's backend (the relay's rpc proxy); resolves
   *  with the answer's `data`. */
  rpc<T = unknown>(method: string, data?: unknown): Promise<T>;
  request(frame: Record<string, unknown>): Promise<Record<string, unknown>>;
  /** Handles one frame as if it came from the relay (for tests of the wire format). */
  handleFrame(frame: Record<string, unknown>): void;
}
