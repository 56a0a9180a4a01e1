//! Sans-IO logic of the device provisioning service: the data model and its JSON wire shapes,
//! DPS error codes, SAS tokens, attestation input validation and the service API's routing rules.
//! No runtime, no sockets, no clock reads: callers pass `now` in.

pub mod allocation;
pub mod amqp;
pub mod amqp_connection;
pub mod ca;
pub mod device;
pub mod error;
pub mod hub;
pub mod ids;
pub mod model;
pub mod mqtt_session;
pub mod rate;
pub mod registration;
pub mod request;
pub mod rights;
pub mod sas;
pub mod service_route;
pub mod time;
pub mod tpm;
pub mod tracking;
pub mod validate;
pub mod websocket;
pub mod x509;
