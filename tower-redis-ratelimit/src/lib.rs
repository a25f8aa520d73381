//! Rate limit `Layer` for tower: exact limits shared through Redis
//! ([`tower_redis_core::RedisManager`]), decided in one round trip, with an
//! in-process limiter while Redis is down.
//!
//! **Status: not implemented yet.** This crate reserves the name and the place
//! in the workspace; nothing here is usable. The planned shape (see the
//! workspace's design notes): `RateLimitLayer` → `RateLimit<S>`, GCRA and
//! window policies decided together in one Lua script, IETF `RateLimit`
//! response fields, `grpc-status: 8` for gRPC.
