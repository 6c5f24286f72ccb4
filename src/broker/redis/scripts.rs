//! The Lua scripts of the Redis broker. Each touches only the keys of one channel
//! (its hash tag), so each runs on the one shard, or Redis Cluster slot, that owns
//! the channel.

use std::sync::LazyLock;

/// Drops the presence entries whose node stopped refreshing them (their expiry in the
/// sorted set has passed). KEYS: entries hash, expiry sorted set. ARGV: now (ms).
pub(super) const PRUNE_LUA: &str = r#"
local now = tonumber(ARGV[1])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
for i = 1, #expired do redis.call('HDEL', KEYS[1], expired[i]) end
if #expired > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now) end
"#;

/// Reads a channel's presence: prunes it ([`PRUNE_LUA`]), then returns how many
/// entries there are and up to `max` of them (all with `max` 0).
///
/// KEYS: entries hash, expiry sorted set. ARGV: now (ms), max. Returns `{total, {entry..}}`.
pub(super) static PRESENCE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{PRUNE_LUA}{}",
        r#"
local total = redis.call('HLEN', KEYS[1])
local max = tonumber(ARGV[2])
local out = {}
if max == 0 or total <= max then
  out = redis.call('HVALS', KEYS[1])
else
  local cursor = '0'
  repeat
    local page = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 100)
    cursor = page[1]
    local kv = page[2]
    for i = 2, #kv, 2 do
      if #out < max then out[#out + 1] = kv[i] end
    end
  until cursor == '0' or #out >= max
end
return {total, out}
"#
    ))
});

/// Stores a publication in its channel's history under the next offset and
/// publishes it, atomically. A channel without a meta key (new, expired or lost)
/// starts a new epoch, and its stale stream, if any, is dropped with it.
///
/// KEYS: stream, meta. ARGV: pub/sub channel, envelope head, data, history size,
/// history TTL (ms), meta TTL (ms), epoch for a new history, publish command
/// (`PUBLISH`, or `SPUBLISH` on a cluster).
/// Returns `{offset, epoch}`.
pub(super) static PUBLISH_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[7]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 's', 0)
end
local offset = redis.call('HINCRBY', KEYS[2], 's', 1)
local pos = string.format('%d', offset) .. ':' .. epoch
local payload = ARGV[2] .. string.char(#pos) .. pos .. ARGV[3]
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[4], string.format('%d-0', offset), 'p', payload)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
redis.call(ARGV[8], ARGV[1], payload)
return {offset, epoch}
"#,
    )
});

/// Publishes a delivery probe the way [`PUBLISH_SCRIPT`] publishes a publication:
/// from a script. Redis runs a script on the master only (a replica answers
/// `MOVED`), whereas a bare `SPUBLISH` is run by a replica too; so a subscription
/// that landed on a replica, which the master does not forward to yet (a Redis
/// Cluster failover seen through a stale slot map), fails the probe as it fails
/// the channels' publications.
///
/// KEYS: the probe's pub/sub channel (it names the slot). ARGV: nonce, publish
/// command (`PUBLISH`, or `SPUBLISH` on a cluster).
pub(super) static PROBE_SCRIPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new("return redis.call(ARGV[2], KEYS[1], ARGV[1])"));

/// Reads a channel's position and, optionally, stored envelopes: the latest `limit`
/// (since epoch empty), or up to `limit` after the since offset when the since epoch
/// is current (none when all-or-nothing and more than `limit` follow it).
///
/// A channel without a meta key has no position. A read made for a subscription
/// (a TTL given) creates one — a new epoch at offset 0 — so the position the
/// subscriber is given stays valid until the first publish, which keeps it and
/// gives it the full meta TTL. Until then it expires after that short TTL, which
/// the nodes holding subscribers renew ([`KEEP_UNPUBLISHED_LUA`]), so names clients
/// make up leave nothing behind. Any other read (TTL 0) writes nothing and reports
/// offset 0 in the epoch it was given, which is not kept.
///
/// The entries returned are bounded in bytes (each counts its size plus the
/// overhead given): the newest that fit for a read of the latest, the oldest that
/// fit for a read after a position (none when all-or-nothing); `truncated` says some
/// were left out. The stream is read in full inside Redis either way; what is
/// bounded is the reply, which is what the node holds and Redis writes out.
///
/// KEYS: stream, meta. ARGV: epoch for a new history, TTL (ms) of a position
/// created here (0: create none), since epoch, since offset, limit, all-or-nothing
/// (`1`/`0`), most bytes (0: no bound), overhead per entry. Returns
/// `{epoch, top, {envelope..}, truncated (0/1)}`.
pub(super) static HISTORY_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local epoch = redis.call('HGET', KEYS[2], 'e')
if not epoch then
  epoch = ARGV[1]
  if ARGV[2] == '0' then return {epoch, 0, {}, 0} end
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'e', epoch, 's', 0)
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
local top = tonumber(redis.call('HGET', KEYS[2], 's'))
local limit = tonumber(ARGV[5])
local budget = tonumber(ARGV[7])
local overhead = tonumber(ARGV[8])
local bounded = budget > 0
local truncated = 0
local function fits(entry)
  if not bounded then return true end
  local size = #entry + overhead
  if size > budget then truncated = 1; return false end
  budget = budget - size
  return true
end
local entries = {}
if limit > 0 then
  if ARGV[3] == '' then
    local rev = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', limit)
    local n = 0
    for i = 1, #rev do
      if not fits(rev[i][2][2]) then break end
      n = i
    end
    for i = n, 1, -1 do entries[#entries + 1] = rev[i][2][2] end
  elseif ARGV[3] == epoch then
    local since = tonumber(ARGV[4])
    if not (ARGV[6] == '1' and top - since > limit) then
      local range = redis.call('XRANGE', KEYS[1], string.format('%d-0', since + 1), '+', 'COUNT', limit)
      for i = 1, #range do
        if not fits(range[i][2][2]) then break end
        entries[#entries + 1] = range[i][2][2]
      end
      if truncated == 1 and ARGV[6] == '1' then entries = {} end
    end
  end
end
return {epoch, top, entries, truncated}
"#,
    )
});

/// Renews the position of a channel nobody has published to yet (top offset 0),
/// which a subscribe created with a short TTL; leaves a published channel's (which
/// has the full meta TTL) and a missing one alone. KEYS: meta. ARGV: TTL (ms).
pub(super) const KEEP_UNPUBLISHED_LUA: &str = r#"
if redis.call('HGET', KEYS[1], 's') == '0' then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
"#;

/// Adds (or updates) a connection's entry among its user's connections, unless the
/// user already has `max` live ones (0: no limit); an update never counts against
/// the limit. Prunes expired entries first ([`PRUNE_LUA`]).
///
/// KEYS: entries hash, expiry sorted set. ARGV: now (ms), expiry (ms), member,
/// entry, max, key TTL (ms). Returns 1 when added, 0 when refused.
pub(super) static USER_ADD_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&format!(
        "{PRUNE_LUA}{}",
        r#"
local max = tonumber(ARGV[5])
if max > 0 and redis.call('HEXISTS', KEYS[1], ARGV[3]) == 0
   and redis.call('HLEN', KEYS[1]) >= max then
  return 0
end
redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
return 1
"#
    ))
});
