//! The trackgate operator: `TrackerPortPool` → port allocation → listener shards.
//!
//! ```text
//!  TrackerPortPool ─┐                ┌─ allocate (pure) ─┐
//!  devicesFrom CMs ─┼─ controller ──►│                   ├─► desired (pure) ─► server-side apply
//!  shard CMs ───────┘  (IO shell)    └─ status (pure) ◄──┘     ConfigMap · Deployment · Service · PDB
//! ```
//!
//! Shared pools skip allocation: [`shared`] turns them into one Deployment and Service.
//!
//! [`allocate`], [`record`] (the authoritative allocation record), [`desired`], [`shared`] and [`status`] are pure and synchronous: no client, no clock (the
//! time is passed in). `trackgate run <pool.yaml>` uses [`desired::plan_local`] to serve a pool
//! on a laptop with the exact allocation the operator would make.

pub mod allocate;
pub mod desired;
pub mod record;
pub mod shared;
pub mod status;

pub mod controller;
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod metrics;
pub mod serve;

pub use serve::{crd_yaml, run};
