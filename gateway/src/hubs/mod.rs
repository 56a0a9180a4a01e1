//! Hub connectors (the trait and the decisions are in `dps_core::hub`): the `mosquitto`
//! connector, the worker threads the connectors' blocking steps run on, and the runner that
//! takes a registration's hub task to its end.

pub mod http;
pub mod mosquitto;
pub mod run;
pub mod workers;
