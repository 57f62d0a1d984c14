//! Who may connect: credentials of an upgrade or a plain HTTP request,
//! checked against the shard's key index, and the abuse limits in front of
//! that check. Nothing here says whether an org or key exists: an unknown,
//! a revoked and a malformed key, and a forged, expired or orphaned session
//! cookie all get the same `401`.
//!
//! Credentials, in order (PROTOCOL.md §2): `?token=`, `Authorization:
//! Bearer`, the `hs_session` cookie. The first one present decides; a wrong
//! token is not rescued by a good cookie. The cookie is the one credential a
//! browser attaches by itself, so it alone is checked against the `Origin`:
//! on the WebSocket the `Origin` must be present and allowed (browsers always
//! send it on upgrades; cross-site WebSocket hijacking is the attack), on
//! plain HTTP routes it must be allowed when present (browsers omit it on
//! same-origin GETs, and SameSite=Lax keeps the cookie off cross-site
//! subrequests).
//!
//! Also here: the `/v1/sessions` route, and the last-used bookkeeping —
//! each shard notes the key ids it authenticated and writes them to the key
//! store every few seconds, on a blocking thread, never once per connection.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::net::IpAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use glommio::net::TcpStream;

use super::ratelimit::{Bucket, IpBuckets};
use super::routes::{respond, respond_error, After, Request};
use super::Shard;
use crate::auth::keys::KeyStore;
use crate::auth::revoked::{self, Revocations};
use crate::auth::sessions::{self, Session, SessionSigner};
use crate::config::Config;
use crate::limits::{KEY_LAST_USED_FLUSH_MS, RATE_LIMIT_ADDRESSES_MAX};
use crate::protocol::http;

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The org every message it sees belongs to.
    pub org_id: String,
    /// The API key id (closing its connections on revocation).
    pub key_id: String,
    /// The session, when the session cookie was the credential: its
    /// [`revoked::session_id`] and expiry (closing its connections on
    /// sign-out).
    pub session: Option<(u128, u64)>,
}

/// One shard's access-control state.
pub struct AccessState {
    /// Signs and checks session cookies; the same secret on every shard.
    signers: RefCell<Signers>,
    /// Signed-out sessions; one list shared by every shard.
    pub revoked: Arc<Revocations>,
    /// Upgrades per source address (PROTOCOL.md §6: 429 past it).
    upgrades: RefCell<IpBuckets>,
    /// Failed authentications per source address; an address with an empty
    /// bucket gets 429 on anything that needs authentication.
    auth_failures: RefCell<IpBuckets>,
    /// Waiting HTTP requests per source address (PROTOCOL.md §6: 429
    /// past this shard's share).
    pub waits: super::waits::AddressLimit,
    /// Public connections per source address that are not WebSockets
    /// (PROTOCOL.md §6: 429 past this shard's share).
    pub http_connections: super::waits::AddressLimit,
    /// Admin-listener connections per source address, with the same
    /// limit (PROTOCOL.md §6).
    pub admin_connections: super::waits::AddressLimit,
    /// Key ids authenticated since the last write of last-used times, with
    /// the time of their latest use.
    used_keys: RefCell<HashMap<String, SystemTime>>,
}

/// The secret cookies are signed with, and the one before it: a cluster
/// node that could not read the cluster's secret at startup signs with its
/// own until it can, and its cookies of that time still verify here.
struct Signers {
    current: SessionSigner,
    previous: Option<SessionSigner>,
}

impl AccessState {
    /// A cookie for a new sign-in to `session`, signed with the current
    /// secret.
    pub fn issue_cookie(&self, session: &Session) -> String {
        self.signers.borrow().current.issue(session)
    }

    /// The session a cookie names, if it is signed with the current secret
    /// or the one before it and has not expired at `now_unix_secs`.
    pub fn verify_cookie(&self, cookie: &str, now_unix_secs: u64) -> Option<Session> {
        let signers = self.signers.borrow();
        signers.current.verify(cookie, now_unix_secs).or_else(|| {
            signers
                .previous
                .as_ref()
                .and_then(|previous| previous.verify(cookie, now_unix_secs))
        })
    }

    /// Signs with `signer` from now on; the secret it replaces still
    /// verifies (cluster mode: the cluster's secret, read late).
    pub fn adopt_signer(&self, signer: SessionSigner) {
        let mut signers = self.signers.borrow_mut();
        let old = std::mem::replace(&mut signers.current, signer);
        signers.previous = Some(old);
    }

    /// This shard's state: its share of the per-address limits of `config`
    /// (see `ratelimit`) and the session signer.
    pub fn new(config: &Config, signer: SessionSigner, revoked: Arc<Revocations>) -> AccessState {
        let upgrades = (config.upgrades_per_ip_per_sec > 0).then(|| {
            Bucket::per_shard(
                f64::from(config.upgrades_per_ip_per_sec),
                f64::from(config.upgrade_burst_per_ip),
                config.shards,
            )
        });
        let auth_failures = (config.auth_failures_per_ip_per_min > 0).then(|| {
            let per_min = f64::from(config.auth_failures_per_ip_per_min);
            Bucket::per_shard(per_min / 60.0, per_min, config.shards)
        });
        AccessState {
            signers: RefCell::new(Signers {
                current: signer,
                previous: None,
            }),
            revoked,
            upgrades: RefCell::new(IpBuckets::new(upgrades, RATE_LIMIT_ADDRESSES_MAX)),
            auth_failures: RefCell::new(IpBuckets::new(auth_failures, RATE_LIMIT_ADDRESSES_MAX)),
            waits: super::waits::AddressLimit::new(config.http_waits_per_ip, config.shards),
            http_connections: super::waits::AddressLimit::new(
                config.http_connections_per_ip,
                config.shards,
            ),
            admin_connections: super::waits::AddressLimit::new(
                config.http_connections_per_ip,
                config.shards,
            ),
            used_keys: RefCell::new(HashMap::new()),
        }
    }

    fn note_used(&self, key_id: &str) {
        let now = SystemTime::now();
        let mut used = self.used_keys.borrow_mut();
        match used.get_mut(key_id) {
            Some(at) => *at = now,
            None => {
                used.insert(key_id.to_string(), now);
            }
        }
    }
}

/// The credentials of a request, whichever way it came.
struct Presented<'a> {
    /// `?token=` or, failing that, the bearer token.
    key: Option<Cow<'a, str>>,
    /// The `hs_session` cookie.
    cookie: Option<&'a str>,
    /// The `Origin` header, trimmed.
    origin: Option<&'a [u8]>,
    /// The `Host` header, the default allowed origin.
    host: &'a [u8],
}

/// Where a request arrived; decides how strict the `Origin` rule is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Surface {
    /// `GET /v1/ws`: a cookie needs an `Origin`, and it must be allowed.
    WebSocket,
    /// Plain HTTP routes: a present `Origin` must be allowed.
    Http,
}

/// True when `origin` may use the session cookie. With no
/// `--allowed-origins` the request's own `Host` is the allowed origin, under
/// either scheme (TLS is terminated in front of hookstream when used, so the
/// browser's scheme can be `https` while we see plain HTTP); a default port
/// in the origin is ignored. Comparisons are ASCII case-insensitive.
pub fn origin_allowed(allowed_origins: &[String], origin: &[u8], host: &[u8]) -> bool {
    if !allowed_origins.is_empty() {
        return allowed_origins
            .iter()
            .any(|allowed| allowed.as_bytes().eq_ignore_ascii_case(origin));
    }
    let strip = |prefix: &[u8]| {
        (origin.len() > prefix.len() && origin[..prefix.len()].eq_ignore_ascii_case(prefix))
            .then(|| &origin[prefix.len()..])
    };
    let (authority, default_port): (&[u8], &[u8]) = match strip(b"http://") {
        Some(rest) => (rest, b":80"),
        None => match strip(b"https://") {
            Some(rest) => (rest, b":443"),
            None => return false,
        },
    };
    let without_port = |text: &'_ [u8]| -> Vec<u8> {
        let text = text.to_ascii_lowercase();
        match text.strip_suffix(default_port) {
            Some(short) => short.to_vec(),
            None => text,
        }
    };
    !host.is_empty() && without_port(authority) == without_port(host)
}

fn check_key(shard: &Shard, presented: &str) -> Result<Principal, u16> {
    let keys = shard.keys.get();
    keys.authenticate(presented)
        .map(|key| Principal {
            org_id: key.org_id.clone(),
            key_id: key.id.clone(),
            session: None,
        })
        .ok_or(401)
}

fn check_cookie(shard: &Shard, cookie: &str) -> Result<Principal, u16> {
    let Session {
        org_id,
        key_id,
        expires_unix_secs,
    } = shard
        .access
        .verify_cookie(cookie, sessions::now_unix_secs())
        .ok_or(401u16)?;
    // A signed-out session is refused like any bad credential, on every
    // shard (the list is shared) and after a restart (it is on disk).
    let id = revoked::session_id(cookie);
    if shard
        .access
        .revoked
        .is_revoked(id, &key_id, expires_unix_secs)
    {
        return Err(401);
    }
    // A session dies with its key: the key must still be active, for the
    // org the cookie names.
    let keys = shard.keys.get();
    match keys.org_of(&key_id) {
        Some(active_org) if active_org == org_id => Ok(Principal {
            org_id,
            key_id,
            session: Some((id, expires_unix_secs)),
        }),
        _ => Err(401),
    }
}

/// True while the credential `principal` came with would still be
/// accepted: its key is active and, for a session, it is not signed out
/// (long-lived answers such as SSE streams check this as they go).
pub fn still_valid(shard: &Shard, principal: &Principal) -> bool {
    credential_still_valid(shard, &principal.key_id, principal.session)
}

/// [`still_valid`] for a key id and, when a cookie was the credential, the
/// session's id and expiry (an expired session is no longer a credential,
/// as its cookie no longer verifies).
pub fn credential_still_valid(shard: &Shard, key_id: &str, session: Option<(u128, u64)>) -> bool {
    if !shard.keys.get().is_active(key_id) {
        return false;
    }
    match session {
        Some((id, expires)) => {
            sessions::now_unix_secs() < expires
                && !shard.access.revoked.is_revoked(id, key_id, expires)
        }
        None => true,
    }
}

/// The common path: credentials in order, origin rule for cookies,
/// failed-authentication limit, bookkeeping. A valid credential is always
/// accepted, so clients sharing an address (NAT) with one that keeps
/// failing are not locked out; a failure from an address over its limit
/// is answered 429 instead of 401 (keys are 256-bit random and cookies
/// HMAC-signed, so the limit is about load, not guessing).
fn authenticate(
    shard: &Shard,
    presented: Presented<'_>,
    peer: Option<IpAddr>,
    surface: Surface,
) -> Result<Principal, u16> {
    let now = Instant::now();
    let result = if let Some(key) = presented.key.as_deref() {
        check_key(shard, key)
    } else if let Some(cookie) = presented.cookie {
        let origin_ok = match (presented.origin, surface) {
            (Some(origin), _) => {
                origin_allowed(&shard.config.allowed_origins, origin, presented.host)
            }
            (None, Surface::WebSocket) => false,
            (None, Surface::Http) => true,
        };
        if origin_ok {
            check_cookie(shard, cookie)
        } else {
            // Not a guess at a credential: the browser attached the cookie
            // to a request some other site made. Not counted as a failure.
            return Err(403);
        }
    } else {
        return Err(401);
    };
    match &result {
        Ok(principal) => shard.access.note_used(&principal.key_id),
        Err(_) => {
            if let Some(ip) = peer {
                if !shard.access.auth_failures.borrow_mut().take(ip, now) {
                    return Err(429);
                }
            }
        }
    }
    result
}

/// Authenticates a validated WebSocket upgrade from `peer`; `Err` is the
/// HTTP status: 429 (upgrade or failed-authentication limit), 403 (cookie
/// from a refused or missing origin), 401.
pub fn authenticate_upgrade(
    shard: &Shard,
    upgrade: &http::Upgrade<'_>,
    peer: Option<IpAddr>,
) -> Result<Principal, u16> {
    if let Some(ip) = peer {
        if !shard.access.upgrades.borrow_mut().take(ip, Instant::now()) {
            return Err(429);
        }
    }
    let presented = Presented {
        key: upgrade
            .token
            .clone()
            .or_else(|| upgrade.bearer.map(Cow::Borrowed)),
        cookie: upgrade.session_cookie,
        origin: upgrade.origin,
        host: upgrade.host,
    };
    authenticate(shard, presented, peer, Surface::WebSocket)
}

/// The `hs_session` cookie of a plain request, from any `Cookie` header.
fn request_cookie(request: &Request) -> Option<&str> {
    request
        .headers
        .iter()
        .filter(|(name, _)| name == "cookie")
        .find_map(|(_, value)| http::cookie_value(value, http::SESSION_COOKIE_NAME))
}

/// Authenticates a plain HTTP request on the public listener: token, then
/// bearer, then the session cookie (with a present `Origin` allowed). `Err`
/// is the HTTP status to answer: 401, 403 or 429.
pub fn authenticate_request(shard: &Shard, request: &Request) -> Result<Principal, u16> {
    let token = request.query_param("token").filter(|t| !t.is_empty());
    let bearer = request
        .header("authorization")
        .and_then(http::bearer_token)
        .map(str::to_string);
    let presented = Presented {
        key: token.or(bearer).map(Cow::Owned),
        cookie: request_cookie(request),
        origin: request.header("origin").map(<[u8]>::trim_ascii),
        host: &request.host,
    };
    authenticate(
        shard,
        presented,
        request.peer.map(|p| p.ip()),
        Surface::Http,
    )
}

/// The methods `/v1/sessions` takes (its 405s' `Allow`).
pub const SESSIONS_ALLOW: &str = "GET, POST, DELETE";

/// `POST /v1/sessions` (with a key as bearer token) sets the session
/// cookie; `DELETE /v1/sessions` clears it; `GET /v1/sessions` says who the
/// credentials of the request (any kind, by the rules of
/// [`authenticate_request`]) belong to, so a page can tell whether it is
/// signed in. Answers are never cached.
pub async fn sessions_route(shard: &Shard, request: &Request, stream: &mut TcpStream) -> After {
    // The cookie is marked Secure when the public listener speaks TLS.
    const NO_STORE: (&str, &str) = ("Cache-Control", "no-store");
    match request.method.as_str() {
        "GET" => match authenticate_request(shard, request) {
            Ok(principal) => {
                let body = serde_json::json!({
                    "org_id": principal.org_id,
                    "key_id": principal.key_id,
                })
                .to_string();
                respond(
                    stream,
                    200,
                    "application/json",
                    &[NO_STORE],
                    body.as_bytes(),
                )
                .await
            }
            Err(status) => respond_error(stream, status, &[NO_STORE]).await,
        },
        "POST" => {
            // Only as a bearer token, and from an allowed origin when the
            // request has one: a page of another site can neither set the
            // header without a CORS preflight (never granted) nor, with a
            // plain form, sign the browser in to the other site's org.
            if let Some(origin) = request.header("origin").map(<[u8]>::trim_ascii) {
                if !origin_allowed(&shard.config.allowed_origins, origin, &request.host) {
                    return respond_error(stream, 403, &[NO_STORE]).await;
                }
            }
            let bearer = request
                .header("authorization")
                .and_then(http::bearer_token)
                .map(str::to_string);
            let presented = Presented {
                key: bearer.map(Cow::Owned),
                // A session is opened with a key only, so that a stolen
                // cookie cannot renew itself forever.
                cookie: None,
                origin: None,
                host: &request.host,
            };
            let principal = match authenticate(
                shard,
                presented,
                request.peer.map(|p| p.ip()),
                Surface::Http,
            ) {
                Ok(principal) => principal,
                Err(status) => return respond_error(stream, status, &[NO_STORE]).await,
            };
            let ttl_secs = shard.config.session_ttl_secs;
            let expires_unix_secs = sessions::now_unix_secs().saturating_add(ttl_secs);
            let cookie = shard.access.issue_cookie(&Session {
                org_id: principal.org_id.clone(),
                key_id: principal.key_id.clone(),
                expires_unix_secs,
            });
            let expires_at = humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + Duration::from_secs(expires_unix_secs),
            )
            .to_string();
            let body = serde_json::json!({
                "org_id": principal.org_id,
                "key_id": principal.key_id,
                "expires_at": expires_at,
            })
            .to_string();
            let set_cookie = sessions::set_cookie_value(&cookie, ttl_secs, shard.tls.is_some());
            respond(
                stream,
                200,
                "application/json",
                &[("Set-Cookie", &set_cookie), NO_STORE],
                body.as_bytes(),
            )
            .await
        }
        "DELETE" => {
            // Signing out needs no credential, but a page of another site
            // may not sign the browser out either.
            if let Some(origin) = request.header("origin").map(<[u8]>::trim_ascii) {
                if !origin_allowed(&shard.config.allowed_origins, origin, &request.host) {
                    return respond_error(stream, 403, &[NO_STORE]).await;
                }
            }
            let clear = sessions::clear_cookie_value(shard.tls.is_some());
            // The cookie itself stops working: a cookie that verifies (ours,
            // not expired) is put on the signed-out list, in memory at once
            // (every shard refuses it from here on; each closes its
            // connections within KEY_RELOAD_MS), then on disk before the
            // answer. Anything else has nothing to sign out.
            let now = sessions::now_unix_secs();
            let session = request_cookie(request)
                .and_then(|cookie| Some((cookie, shard.access.verify_cookie(cookie, now)?)));
            if let Some((cookie, session)) = session {
                let revocations = shard.access.revoked.clone();
                let pending = revocations.revoke(
                    revoked::session_id(cookie),
                    &session.key_id,
                    session.expires_unix_secs,
                    now,
                );
                let result = glommio::executor()
                    .spawn_blocking(move || revocations.persist(pending, now))
                    .await;
                if let Err(e) = result {
                    // Signed out in this process; a restart would forget it.
                    crate::log::error(format_args!(
                        "hookstream: shard {}: a sign-out was not saved: {e}",
                        shard.id
                    ));
                    return respond_error(stream, 500, &[("Set-Cookie", &clear), NO_STORE]).await;
                }
                // Cluster mode: every other node takes it from JetStream.
                if let Some(cluster) = &shard.cluster {
                    let sent = cluster
                        .bridge
                        .sign_out(
                            revoked::session_id(cookie),
                            &session.key_id,
                            session.expires_unix_secs,
                        )
                        .await;
                    if !matches!(sent, Ok(Ok(()))) {
                        eprintln!(
                            "hookstream: cluster: a sign-out is not stored in JetStream yet (announced to the connected nodes; stored once JetStream answers)"
                        );
                    }
                }
            }
            respond(stream, 204, "", &[("Set-Cookie", &clear), NO_STORE], b"").await
        }
        _ => respond_error(stream, 405, &[("Allow", SESSIONS_ALLOW)]).await,
    }
}

/// Writes the last-used times this shard collected, in one locked write of
/// the key store on a blocking thread (the write fsyncs).
pub async fn flush_last_used(shard: &Shard) {
    let used = std::mem::take(&mut *shard.access.used_keys.borrow_mut());
    if used.is_empty() {
        return;
    }
    let stamps: HashMap<String, String> = used
        .into_iter()
        .map(|(id, at)| (id, humantime::format_rfc3339_seconds(at).to_string()))
        .collect();
    let store = KeyStore::new(&shard.config.data_dir);
    let result = glommio::executor()
        .spawn_blocking(move || store.touch(&stamps))
        .await;
    if let Err(e) = result {
        crate::log::warn(format_args!(
            "hookstream: shard {}: last-used times not saved: {e}",
            shard.id
        ));
    }
}

/// Every `KEY_LAST_USED_FLUSH_MS`, writes the last-used times collected.
pub async fn last_used_loop(shard: Rc<Shard>) {
    let interval = Duration::from_millis(KEY_LAST_USED_FLUSH_MS);
    while shard
        .shutdown
        .run_until(glommio::timer::sleep(interval))
        .await
        .is_some()
    {
        flush_last_used(&shard).await;
    }
    // Draining: what was used since the last write.
    flush_last_used(&shard).await;
}

#[cfg(test)]
mod tests {
    use super::origin_allowed;

    #[test]
    fn default_origin_is_the_host() {
        let none: &[String] = &[];
        assert!(origin_allowed(none, b"http://example.com", b"example.com"));
        assert!(origin_allowed(none, b"https://example.com", b"example.com"));
        assert!(origin_allowed(none, b"HTTP://Example.COM", b"example.com"));
        assert!(origin_allowed(
            none,
            b"http://127.0.0.1:8080",
            b"127.0.0.1:8080"
        ));
        assert!(origin_allowed(
            none,
            b"http://example.com",
            b"example.com:80"
        ));
        assert!(origin_allowed(
            none,
            b"https://example.com:443",
            b"example.com"
        ));
        assert!(!origin_allowed(none, b"http://evil.com", b"example.com"));
        assert!(!origin_allowed(
            none,
            b"http://example.com.evil.com",
            b"example.com"
        ));
        assert!(!origin_allowed(
            none,
            b"http://127.0.0.1:8081",
            b"127.0.0.1:8080"
        ));
        assert!(!origin_allowed(none, b"null", b"example.com"));
        assert!(!origin_allowed(none, b"example.com", b"example.com"));
        assert!(!origin_allowed(none, b"ws://example.com", b"example.com"));
    }

    #[test]
    fn configured_origins_replace_the_default() {
        let allowed = vec!["https://app.example.com".to_string()];
        assert!(origin_allowed(
            &allowed,
            b"https://app.example.com",
            b"gateway.example.com"
        ));
        assert!(origin_allowed(
            &allowed,
            b"HTTPS://APP.example.com",
            b"gateway.example.com"
        ));
        assert!(!origin_allowed(
            &allowed,
            b"http://gateway.example.com",
            b"gateway.example.com"
        ));
    }
}
