//! Hub connectors (the trait and the decisions are in `dps_core::hub`): `mosquitto`,
//! `azure-iothub` and `webhook`, the worker threads their blocking steps run on, and the runner
//! that takes a registration's pending work (custom allocation, hub task) to its end.

pub mod azure_iothub;
pub mod http;
pub mod mosquitto;
pub mod run;
pub mod webhook;
pub mod workers;
