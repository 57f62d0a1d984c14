//! Authentication: the hashed API key store and the admin token.

pub mod keys;
