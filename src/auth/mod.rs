//! Authentication: the hashed API key store, the admin token, and signed
//! browser session cookies and the list of signed-out ones.

pub mod keys;
pub mod revoked;
pub mod sessions;
