//! HTTP response cache `Layer` for tower, stored in Redis through
//! [`tower_redis_core::RedisManager`], with a bounded in-process store while
//! Redis is down.
//!
//! **Status: not implemented yet.** This crate reserves the name and the place
//! in the workspace; nothing here is usable. The planned shape (see the
//! workspace's design notes): `CacheLayer` → `Cache<S>`, RFC 9111
//! shared-cache rules, `Cache-Status` (RFC 9211) on every response, one Redis
//! round trip per hit.
