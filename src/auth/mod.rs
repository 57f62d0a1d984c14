//! Authentication: the hashed API key store, the admin token, and signed
//! browser session cookies.

pub mod keys;
pub mod sessions;
