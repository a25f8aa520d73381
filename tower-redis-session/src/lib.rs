//! Session `Layer` for tower and axum, stored in Redis
//! ([`tower_redis_core::RedisManager`]) and kept in process while Redis is down.
//!
//! **Status: not implemented yet.** This crate reserves the name and the place
//! in the workspace; nothing here is usable. The planned shape (see the
//! workspace's design notes): `SessionLayer` → `SessionService<S>`, a
//! `Session` extractor, lazy loading (no Redis call when the handler does not
//! touch the session), per-key writes so concurrent requests lose nothing.
