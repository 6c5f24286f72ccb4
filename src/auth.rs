//! Who may connect and what each connection may touch: JWT verification, channel
//! permissions, the origin policy, API keys, and the per-connection publish rate.
//!
//! With no JWT key configured every connection gets [`Grants::anyone`]. With a key, a
//! connection needs a valid token (its `exp` is required and checked with
//! `--jwt-leeway`), and may subscribe to the channels its `channels` claim matches
//! and publish to those its `publish` claim matches: exact names, or `prefix*`
//! wildcards (`room:*`, or `*` for everything). A missing claim grants nothing.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use crate::config::{AuthConfig, ConfigError};

/// Why a connection was refused before the upgrade.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token in `Authorization: Bearer` nor `?token=`.
    #[error("missing token: send Authorization: Bearer <jwt> or ?token=<jwt>")]
    Missing,
    /// The token's signature, format, algorithm or claims are wrong.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The token is past its `exp`.
    #[error("token expired")]
    Expired,
}

/// A JWT key or file that cannot be used, named by its flag.
#[derive(Debug, thiserror::Error)]
#[error("invalid --{flag}: {reason}")]
pub struct KeyError {
    flag: &'static str,
    reason: String,
}

impl From<KeyError> for ConfigError {
    fn from(e: KeyError) -> Self {
        ConfigError::new(e.flag, e.reason)
    }
}

impl KeyError {
    /// The flag at fault.
    pub fn flag(&self) -> &'static str {
        self.flag
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Verifies connection tokens.
#[derive(Clone)]
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .field("leeway", &self.validation.leeway)
            .finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    exp: u64,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    /// Present means given, even as `null` (which is then refused like any other
    /// non-object): `Option`'s own deserializer would take `null` for absent.
    #[serde(default, deserialize_with = "present")]
    info: Option<Box<serde_json::value::RawValue>>,
    /// Channels the connection is subscribed to at connect, server-side.
    #[serde(default)]
    subscribe: Vec<String>,
    /// The token's id, for revocation.
    #[serde(default)]
    jti: Option<String>,
    /// When the token was issued (Unix seconds), for revoking a user's older tokens.
    #[serde(default)]
    iat: Option<u64>,
}

fn present<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<Box<serde_json::value::RawValue>>, D::Error> {
    Box::<serde_json::value::RawValue>::deserialize(d).map(Some)
}

/// Largest `info` claim, in bytes of JSON: it travels with every presence entry and
/// join/leave event of the connection.
pub const MAX_INFO_BYTES: usize = 1024;

impl Verifier {
    /// The verifier the configuration asks for, or `None` when auth is off.
    pub fn from_config(config: &AuthConfig) -> Result<Option<Verifier>, KeyError> {
        let err = |flag, reason: String| KeyError { flag, reason };
        let (key, algorithm) = if let Some(secret) = &config.jwt_secret {
            (
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            )
        } else if let Some(path) = &config.jwt_secret_file {
            let secret = std::fs::read(path)
                .map_err(|e| err("jwt-secret-file", format!("{}: {e}", path.display())))?;
            let secret = secret.trim_ascii_end();
            if secret.is_empty() {
                return Err(err("jwt-secret-file", "the file is empty".into()));
            }
            (DecodingKey::from_secret(secret), Algorithm::HS256)
        } else if let Some(path) = &config.jwt_public_key_file {
            let pem = std::fs::read(path)
                .map_err(|e| err("jwt-public-key-file", format!("{}: {e}", path.display())))?;
            // The key type decides the algorithm: RSA keys verify RS256, EC P-256 keys ES256.
            match DecodingKey::from_rsa_pem(&pem) {
                Ok(key) => (key, Algorithm::RS256),
                Err(_) => match DecodingKey::from_ec_pem(&pem) {
                    Ok(key) => (key, Algorithm::ES256),
                    Err(e) => {
                        return Err(err(
                            "jwt-public-key-file",
                            format!("not an RSA or EC public key in PEM: {e}"),
                        ));
                    }
                },
            }
        } else {
            return Ok(None);
        };
        let mut validation = Validation::new(algorithm);
        validation.leeway = config.jwt_leeway.as_secs();
        validation.validate_exp = true;
        // A token not valid yet (`nbf` in the future, beyond the leeway) is refused:
        // whoever minted it said so.
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.set_required_spec_claims(&["exp"]);
        Ok(Some(Verifier { key, validation }))
    }

    /// Checks a token and returns what it grants.
    pub fn verify(&self, token: &str) -> Result<Grants, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => AuthError::Expired,
                jsonwebtoken::errors::ErrorKind::ImmatureSignature => {
                    AuthError::Invalid("not valid yet (nbf is in the future)".into())
                }
                _ => AuthError::Invalid(e.to_string()),
            },
        )?;
        let claims = data.claims;
        if let Some(info) = &claims.info {
            let text = info.get();
            if !text.starts_with('{') || text.len() > MAX_INFO_BYTES {
                return Err(AuthError::Invalid(format!(
                    "the info claim must be a JSON object of at most {MAX_INFO_BYTES} bytes"
                )));
            }
        }
        if let Some(bad) = claims
            .subscribe
            .iter()
            .find(|c| crate::protocol::validate_channel(c).is_err())
        {
            return Err(AuthError::Invalid(format!(
                "the subscribe claim names {bad:?}, which is not a channel name"
            )));
        }
        Ok(Grants {
            user: claims.sub,
            info: claims.info.map(|i| Arc::from(i.get())),
            subscribe: claims.channels.iter().map(|p| Pattern::parse(p)).collect(),
            publish: claims.publish.iter().map(|p| Pattern::parse(p)).collect(),
            server_channels: claims.subscribe,
            token: Some(TokenId {
                jti: claims.jti,
                issued_at: claims.iat,
            }),
            // An `exp` beyond what the clock can represent (up to 2^64 - 1 is
            // valid JSON) is simply a token that does not expire in practice:
            // checked arithmetic, never a panic on a correctly signed token.
            expires: UNIX_EPOCH
                .checked_add(Duration::from_secs(claims.exp))
                .and_then(|t| t.checked_add(Duration::from_secs(self.validation.leeway))),
        })
    }
}

/// A channel permission: an exact name or a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    Prefix(String),
}

impl Pattern {
    fn parse(pattern: &str) -> Pattern {
        match pattern.strip_suffix('*') {
            Some(prefix) => Pattern::Prefix(prefix.to_owned()),
            None => Pattern::Exact(pattern.to_owned()),
        }
    }

    fn matches(&self, channel: &str) -> bool {
        match self {
            Pattern::Exact(name) => name == channel,
            Pattern::Prefix(prefix) => channel.starts_with(prefix.as_str()),
        }
    }
}

/// What one connection may do.
#[derive(Debug, Clone)]
pub struct Grants {
    /// The token's `sub`, if any.
    pub user: Option<String>,
    /// The token's `info` claim (a JSON object, as sent), shown in presence.
    pub info: Option<Arc<str>>,
    subscribe: Vec<Pattern>,
    publish: Vec<Pattern>,
    /// When the token stops being valid (its `exp` plus the leeway); `None`: never
    /// (no auth, or an `exp` past what the clock can represent).
    expires: Option<SystemTime>,
    /// Channels to subscribe the connection to at connect, server-side (a token's
    /// `subscribe` claim, the connect proxy's `subscribe`).
    pub server_channels: Vec<String>,
    /// What identifies the connection's token, when it came with one.
    pub token: Option<TokenId>,
}

/// What revocation knows of a token.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenId {
    /// Its `jti`.
    pub jti: Option<String>,
    /// Its `iat` (Unix seconds).
    pub issued_at: Option<u64>,
}

/// The connect proxy's `result` (docs/proxy.md): who the user is and what it may do.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectResult {
    user: String,
    #[serde(default)]
    info: Option<Box<serde_json::value::RawValue>>,
    #[serde(default)]
    expire_at: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
    #[serde(default)]
    subscribe: Vec<String>,
}

impl Grants {
    /// Everything, forever: for nodes without auth.
    pub fn anyone() -> Grants {
        Grants {
            user: None,
            info: None,
            subscribe: vec![Pattern::Prefix(String::new())],
            publish: vec![Pattern::Prefix(String::new())],
            expires: None,
            server_channels: Vec::new(),
            token: None,
        }
    }

    /// Nothing at all: a connection whose grants the connect proxy has not given yet.
    pub fn nobody() -> Grants {
        Grants {
            user: None,
            info: None,
            subscribe: Vec::new(),
            publish: Vec::new(),
            expires: None,
            server_channels: Vec::new(),
            token: None,
        }
    }

    /// The grants a connect proxy's answer gives, or why they cannot be used.
    pub fn from_connect(result: ConnectResult) -> Result<Grants, String> {
        if let Some(info) = &result.info {
            let text = info.get();
            if !text.starts_with('{') || text.len() > MAX_INFO_BYTES {
                return Err(format!(
                    "info must be a JSON object of at most {MAX_INFO_BYTES} bytes"
                ));
            }
        }
        if let Some(bad) = result
            .subscribe
            .iter()
            .find(|c| crate::protocol::validate_channel(c).is_err())
        {
            return Err(format!("subscribe names {bad:?}, which is not a channel"));
        }
        Ok(Grants {
            user: (!result.user.is_empty()).then_some(result.user),
            info: result.info.map(|i| Arc::from(i.get())),
            subscribe: result.channels.iter().map(|p| Pattern::parse(p)).collect(),
            publish: result.publish.iter().map(|p| Pattern::parse(p)).collect(),
            expires: result
                .expire_at
                .and_then(|at| UNIX_EPOCH.checked_add(Duration::from_secs(at))),
            server_channels: result.subscribe,
            token: None,
        })
    }

    /// The same grants, expiring at `at` (Unix seconds; `None`: never).
    pub fn expiring(&self, at: Option<u64>) -> Grants {
        Grants {
            expires: at.and_then(|at| UNIX_EPOCH.checked_add(Duration::from_secs(at))),
            ..self.clone()
        }
    }

    /// Whether the grants expire at all.
    pub fn expires(&self) -> bool {
        self.expires.is_some()
    }

    /// Whether the connection may subscribe to `channel`. A user-limited channel
    /// (`dm#alice,bob`) takes its listed users, and only them, whatever the grants.
    pub fn may_subscribe(&self, channel: &str) -> bool {
        match self.listed(channel) {
            Some(listed) => listed,
            None => self.subscribe.iter().any(|p| p.matches(channel)),
        }
    }

    /// Whether the connection may publish to `channel` (user-limited channels as
    /// for [`may_subscribe`](Self::may_subscribe)).
    pub fn may_publish(&self, channel: &str) -> bool {
        match self.listed(channel) {
            Some(listed) => listed,
            None => self.publish.iter().any(|p| p.matches(channel)),
        }
    }

    /// For a user-limited channel, whether this connection's user is listed.
    fn listed(&self, channel: &str) -> Option<bool> {
        let mut users = crate::protocol::channel_users(channel)?;
        Some(
            self.user
                .as_deref()
                .is_some_and(|me| users.any(|u| u == me)),
        )
    }

    /// The instant the token expires, if it does within what the monotonic clock
    /// can represent (a later expiry is no expiry for this connection).
    pub fn expires_at(&self) -> Option<Instant> {
        let left = self
            .expires?
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        Instant::now().checked_add(left)
    }
}

/// Which browser origins may open WebSockets (`--allowed-origins`).
#[derive(Debug, Clone)]
pub enum OriginPolicy {
    /// Only pages served by this host (`Origin` matches `Host`); the default.
    SameOrigin,
    /// Any origin (an explicit choice, warned about at start-up).
    Any,
    /// The listed origins: `https://app.example.com`, `app.example.com` (any scheme)
    /// or `*.example.com` (any subdomain, any scheme).
    List(Vec<String>),
}

impl OriginPolicy {
    /// The policy for the configured list.
    pub fn from_list(list: &[String]) -> OriginPolicy {
        if list.is_empty() {
            OriginPolicy::SameOrigin
        } else if list.iter().any(|o| o == "*") {
            OriginPolicy::Any
        } else {
            OriginPolicy::List(
                list.iter()
                    .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                    .collect(),
            )
        }
    }

    /// Whether a request with this `Origin` (absent for non-browser clients, which
    /// are always allowed: the policy protects browsers' users, not the relay) and
    /// `Host` may connect.
    pub fn allows(&self, origin: Option<&str>, host: Option<&str>) -> bool {
        let Some(origin) = origin else { return true };
        let origin = origin.trim_end_matches('/').to_ascii_lowercase();
        let origin_host = origin.split_once("://").map_or(origin.as_str(), |(_, h)| h);
        match self {
            OriginPolicy::Any => true,
            OriginPolicy::SameOrigin => host.is_some_and(|h| h.eq_ignore_ascii_case(origin_host)),
            OriginPolicy::List(allowed) => allowed.iter().any(|a| {
                if let Some(suffix) = a.strip_prefix("*.") {
                    let bare = origin_host.split(':').next().unwrap_or(origin_host);
                    bare.ends_with(&format!(".{suffix}"))
                } else if a.contains("://") {
                    *a == origin
                } else {
                    a == origin_host
                }
            }),
        }
    }
}

/// Whether `given` is one of the configured API keys, compared in constant time.
pub fn api_key_matches(keys: &[String], given: &str) -> bool {
    keys.iter().fold(false, |found, key| {
        found | bool::from(key.as_bytes().ct_eq(given.as_bytes()))
    })
}

/// A token bucket: `rate` publishes per second on average, bursts of `burst`.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: u32,
    bucket: TokenBucket,
}

impl RateLimiter {
    /// A full bucket.
    pub fn new(rate: f64, burst: u32) -> RateLimiter {
        RateLimiter {
            rate,
            burst,
            bucket: TokenBucket::full(burst),
        }
    }

    /// Takes a token if there is one. Returns `Ok` when allowed, otherwise how many
    /// publishes in a row have been refused.
    pub fn try_take(&mut self) -> Result<(), u32> {
        self.bucket.try_take(self.rate, self.burst)
    }
}

/// What a token bucket holds, without its rate and burst, which its owner gives on
/// every take: a connection's buckets follow the node's limits, not kept again in
/// every connection.
#[derive(Debug)]
pub struct TokenBucket {
    tokens: f64,
    last: Instant,
    /// Takes refused since the last one that was allowed.
    refused_in_a_row: u32,
}

impl TokenBucket {
    /// A full bucket of `burst` tokens.
    pub fn full(burst: u32) -> TokenBucket {
        TokenBucket {
            tokens: f64::from(burst),
            last: Instant::now(),
            refused_in_a_row: 0,
        }
    }

    /// Takes a token if there is one, the bucket refilling at `rate` per second up
    /// to `burst`. Returns `Ok` when allowed, otherwise how many takes in a row
    /// have been refused.
    pub fn try_take(&mut self, rate: f64, burst: u32) -> Result<(), u32> {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate)
            .min(f64::from(burst));
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            self.refused_in_a_row = 0;
            Ok(())
        } else {
            self.refused_in_a_row += 1;
            Err(self.refused_in_a_row)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let grants = Grants {
            user: None,
            info: None,
            subscribe: ["room:*", "lobby"]
                .iter()
                .map(|p| Pattern::parse(p))
                .collect(),
            publish: vec![Pattern::parse("room:42")],
            expires: None,
            server_channels: Vec::new(),
            token: None,
        };
        assert!(
            grants.may_subscribe("room:1")
                && grants.may_subscribe("room:")
                && grants.may_subscribe("lobby")
        );
        assert!(!grants.may_subscribe("lobby2") && !grants.may_subscribe("roomx"));
        assert!(grants.may_publish("room:42") && !grants.may_publish("room:4"));
        assert!(Grants::anyone().may_publish("anything") && Grants::anyone().may_subscribe("x"));
        // A user-limited channel: its users without a grant, nobody else even with one.
        let ada = Grants {
            user: Some("ada".into()),
            ..grants.clone()
        };
        assert!(ada.may_subscribe("dm#ada,bob") && ada.may_publish("dm#bob,ada"));
        assert!(!ada.may_subscribe("room:x#bob") && !ada.may_publish("#bob"));
        assert!(ada.may_subscribe("#ada"), "a personal channel");
        assert!(
            !Grants::anyone().may_subscribe("#ada"),
            "anonymous: no user channel"
        );
    }

    #[test]
    fn origins() {
        let same = OriginPolicy::from_list(&[]);
        assert!(same.allows(None, Some("relay:8080")), "non-browser clients");
        assert!(same.allows(Some("http://relay:8080"), Some("relay:8080")));
        assert!(!same.allows(Some("http://evil.example"), Some("relay:8080")));
        let list = OriginPolicy::from_list(&[
            "https://app.example.com".into(),
            "*.example.org".into(),
            "plain.test".into(),
        ]);
        assert!(list.allows(Some("https://app.example.com"), None));
        assert!(
            !list.allows(Some("http://app.example.com"), None),
            "scheme given, scheme checked"
        );
        assert!(list.allows(Some("https://a.b.example.org"), None));
        assert!(!list.allows(Some("https://example.org"), None));
        assert!(!list.allows(Some("https://evilexample.org"), None));
        assert!(list.allows(Some("http://plain.test"), None));
        assert!(OriginPolicy::from_list(&["*".into()]).allows(Some("https://anything"), None));
    }

    #[test]
    fn api_keys() {
        let keys = vec!["k1-secret".to_owned(), "k2-secret".to_owned()];
        assert!(api_key_matches(&keys, "k2-secret"));
        assert!(!api_key_matches(&keys, "k2-secre"));
        assert!(!api_key_matches(&[], ""));
    }

    #[tokio::test(start_paused = true)]
    async fn token_bucket() {
        let mut limiter = RateLimiter::new(10.0, 3);
        for _ in 0..3 {
            assert!(limiter.try_take().is_ok());
        }
        assert_eq!(limiter.try_take(), Err(1));
        assert_eq!(limiter.try_take(), Err(2));
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(limiter.try_take().is_ok(), "one token back after 1/rate");
        assert!(limiter.try_take().is_err());
        tokio::time::advance(Duration::from_secs(10)).await;
        for _ in 0..3 {
            assert!(limiter.try_take().is_ok(), "refilled up to the burst only");
        }
        assert!(limiter.try_take().is_err());
    }
}
