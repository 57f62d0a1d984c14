//! Who may connect: credentials of an upgrade or a plain HTTP request,
//! checked against the shard's key index. Token (`?token=`) first, then
//! `Authorization: Bearer`; nothing here says whether an org or key exists.

use super::routes::Request;
use super::Shard;
use crate::protocol::http;

/// An authenticated client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The org every message it sees belongs to.
    pub org_id: String,
    /// The API key id (closing its connections on revocation).
    pub key_id: String,
}

fn check_key(shard: &Shard, presented: &str) -> Result<Principal, u16> {
    let keys = shard.keys.borrow();
    keys.authenticate(presented)
        .map(|key| Principal {
            org_id: key.org_id.clone(),
            key_id: key.id.clone(),
        })
        .ok_or(401)
}

/// Authenticates a validated WebSocket upgrade; `Err` is the HTTP status.
pub fn authenticate_upgrade(shard: &Shard, upgrade: &http::Upgrade<'_>) -> Result<Principal, u16> {
    let presented = upgrade.token.as_deref().or(upgrade.bearer).ok_or(401u16)?;
    check_key(shard, presented)
}

/// Authenticates a plain HTTP request on the public listener.
pub fn authenticate_request(shard: &Shard, request: &Request) -> Result<Principal, u16> {
    let token = request.query_param("token").filter(|t| !t.is_empty());
    let bearer = request
        .header("authorization")
        .and_then(http::bearer_token)
        .map(str::to_string);
    let presented = token.or(bearer).ok_or(401u16)?;
    check_key(shard, &presented)
}
