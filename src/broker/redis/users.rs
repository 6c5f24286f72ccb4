//! Users in Redis: each user's connections across the cluster (a hash of entries
//! and a sorted set of their expiries, as presence keeps a channel's), which the
//! per-user connection limit counts and `GET /api/connections` lists; the
//! revocations of `POST /api/revoke`; and the cluster-wide control channel that
//! carries the server API's commands to every node.
//!
//! Every user key carries the hash tag `{user:<id>}`, so one script sees all of a
//! user's keys on a Redis Cluster; with shards they live on the first shard, with
//! the other cluster-wide keys.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::presence::{add_entries, read_entries, remove_entry};
use super::publish::broadcast;
use super::scripts::{PRUNE_LUA, USER_ADD_SCRIPT};
use super::{Inner, millis};
use crate::auth::TokenId;
use crate::broker::BrokerError;
use crate::broker::presence::Entry;
use crate::envelope;
use crate::users::Command;

/// Adds (or updates) a local connection's entry among its user's connections;
/// `false` when the user already has `max` (0: no limit) live connections.
pub(super) async fn user_add(
    inner: &Inner,
    user: &str,
    entry: Entry,
    max: usize,
) -> Result<bool, BrokerError> {
    let (hash, zset) = user_keys(inner, user);
    let ttl = millis(inner.config.presence.presence_ttl);
    let now = envelope::now_us() / 1000;
    let (member, json) = (entry.member.clone(), entry.json.clone());
    let added: i64 = inner
        .home()
        .idempotent(|mut conn| {
            let (hash, zset, member, json) = (&hash, &zset, &member, &json);
            async move {
                let mut script = USER_ADD_SCRIPT.prepare_invoke();
                script
                    .key(hash)
                    .key(zset)
                    .arg(now)
                    .arg(now + ttl)
                    .arg(member)
                    .arg(&json[..])
                    .arg(max)
                    .arg(2 * ttl);
                script.invoke_async::<i64>(&mut conn).await
            }
        })
        .await?;
    if added == 1 {
        inner.users.add(user, entry);
    }
    Ok(added == 1)
}

/// Removes a local connection's entry (if that fails, it expires: this node no
/// longer refreshes it).
pub(super) async fn user_remove(
    inner: &Inner,
    user: &str,
    member: &str,
) -> Result<(), BrokerError> {
    if !inner.users.remove(user, member) {
        return Ok(());
    }
    inner
        .home()
        .run(&remove_entry(&user_keys(inner, user), member))
        .await
}

/// A user's connection keys: the hash of entries and the sorted set of expiries.
fn user_keys(inner: &Inner, user: &str) -> (String, String) {
    (
        inner.keys.user(user, "conns"),
        inner.keys.user(user, "conns-exp"),
    )
}

/// Every live connection of a user, cluster-wide (entries as JSON).
pub(super) async fn user_connections(inner: &Inner, user: &str) -> Result<Vec<Bytes>, BrokerError> {
    let (entries, _) = read_entries(inner.home(), &user_keys(inner, user), 0).await?;
    Ok(entries)
}

/// One refresh of this node's user entries (with the presence refresh): written
/// again with a new expiry, so entries of a node that died expire and entries
/// Redis lost come back.
pub(super) async fn refresh_users(inner: &Arc<Inner>) {
    let ttl = inner.config.presence.presence_ttl;
    for (user, entries) in inner.users.snapshot() {
        let keys = user_keys(inner, &user);
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(PRUNE_LUA)
            .arg(2)
            .arg(&keys.0)
            .arg(&keys.1)
            .arg(envelope::now_us() / 1000)
            .ignore();
        add_entries(&mut pipe, &keys, ttl, &entries);
        if let Err(e) = inner.home().run(&pipe).await {
            tracing::warn!(error = %e, "user connections refresh failed");
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// Sends a command of the server API to every node; how many nodes received it.
pub(super) async fn command(inner: &Inner, command: &Command) -> Result<usize, BrokerError> {
    let payload = serde_json::to_vec(command).expect("commands always serialise");
    broadcast(inner, &inner.users_control, payload).await
}

/// Stores a revocation: one token (`jti`, kept `ttl`) or every token of `user`
/// issued before `issued_before` (kept `ttl`; a later time wins over an earlier).
pub(super) async fn revoke(
    inner: &Inner,
    user: &str,
    jti: Option<&str>,
    issued_before: Option<u64>,
    ttl: Duration,
) -> Result<(), BrokerError> {
    let mut pipe = redis::pipe();
    if let Some(jti) = jti {
        pipe.cmd("SET")
            .arg(inner.keys.revoked_jti(jti))
            .arg(1)
            .arg("PX")
            .arg(millis(ttl).max(1))
            .ignore();
    }
    if let Some(before) = issued_before {
        // Keeps the latest time: a revocation never un-revokes.
        pipe.cmd("EVAL")
            .arg(
                "local v = tonumber(redis.call('GET', KEYS[1]) or '0') \
                 if tonumber(ARGV[1]) > v then redis.call('SET', KEYS[1], ARGV[1]) end \
                 redis.call('PEXPIRE', KEYS[1], ARGV[2])",
            )
            .arg(1)
            .arg(inner.keys.user(user, "revoked-before"))
            .arg(before)
            .arg(millis(ttl).max(1))
            .ignore();
    }
    inner.home().run(&pipe).await
}

/// Whether a revocation covers this token of `user`.
pub(super) async fn is_revoked(
    inner: &Inner,
    user: Option<&str>,
    token: &TokenId,
) -> Result<bool, BrokerError> {
    let jti_key = token.jti.as_deref().map(|jti| inner.keys.revoked_jti(jti));
    let user_key = user.map(|u| inner.keys.user(u, "revoked-before"));
    let (jti, before) = inner
        .home()
        .idempotent(|mut conn| {
            let (jti_key, user_key) = (&jti_key, &user_key);
            async move {
                let jti: Option<i64> = match jti_key {
                    Some(key) => redis::cmd("GET").arg(key).query_async(&mut conn).await?,
                    None => None,
                };
                let before: Option<u64> = match user_key {
                    Some(key) => redis::cmd("GET").arg(key).query_async(&mut conn).await?,
                    None => None,
                };
                Ok((jti, before))
            }
        })
        .await?;
    Ok(jti.is_some() || crate::users::revokes(Some(token), None, before))
}

/// Checks every local connection's token against the stored revocations and closes
/// the revoked ones: run when this node's control channel is subscribed again
/// after a loss, since the revocation commands sent meanwhile did not reach it.
pub(super) async fn sweep_revoked(inner: Arc<Inner>) {
    let users = &inner.delivery.users;
    let mut closed = 0;
    for (user, conn, token) in users.tokens() {
        match is_revoked(&inner, Some(&user), &token).await {
            Ok(true) => {
                users.revoked(&user, conn);
                closed += 1;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "revocation check after a reconnect failed; tokens are checked again at refresh");
                return;
            }
        }
    }
    if closed > 0 {
        tracing::info!(
            closed,
            "closed connections whose token was revoked while this node was cut from Redis"
        );
    }
}
