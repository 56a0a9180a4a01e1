//! What the store holds and the writes it accepts.

/// The partitions of the keyspace (ARCHITECTURE.md, "Threads and state").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    Enrollments,
    Groups,
    Registrations,
    /// Index `{groupId}\0{registrationId}` → empty record, for the by-group registration query.
    /// The store maintains it from the registration records it writes ([`by_group_key`]).
    RegistrationsByGroup,
    Hubs,
    Meta,
    Operations,
    /// CA certificates and their proof-of-possession state.
    Certificates,
    /// TPM challenges issued and not yet answered, when several nodes share the store (the
    /// answer may reach another node). A single node keeps them in memory.
    Challenges,
}

impl Table {
    pub const ALL: [Table; 9] = [
        Table::Enrollments,
        Table::Groups,
        Table::Registrations,
        Table::RegistrationsByGroup,
        Table::Hubs,
        Table::Meta,
        Table::Operations,
        Table::Certificates,
        Table::Challenges,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Table::Enrollments => "enrollments",
            Table::Groups => "groups",
            Table::Registrations => "registrations",
            Table::RegistrationsByGroup => "registrations_by_group",
            Table::Hubs => "hubs",
            Table::Meta => "meta",
            Table::Operations => "operations",
            Table::Certificates => "certificates",
            Table::Challenges => "challenges",
        }
    }
}

/// A stored value: an opaque etag, a small class tag used for per-class counts (e.g. the
/// attestation type of a group, for quotas), and the plaintext body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub etag: String,
    pub class: u8,
    pub body: Vec<u8>,
}

impl Record {
    /// The JSON body as `T`. The store holds only what the service wrote, so a body that does
    /// not parse is an internal error (logged; the client is told only that much).
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, dps_core::error::ServiceError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            tracing::error!(error = %e, "stored record does not parse");
            dps_core::error::ServiceError::new(dps_core::error::ErrorKind::Internal, "a stored record could not be read")
                .because(format!("stored record does not parse: {e}"))
        })
    }
}

/// A write's precondition on the current value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    Any,
    /// Create only (fails with `Conflict`).
    Absent,
    /// Must exist (fails with `NotFound`).
    Present,
    /// If-Match: must exist and match (`*` matches anything; quotes and `W/` ignored).
    Etag(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// `quota`: when this put creates a record, fail with `QuotaExceeded` if the table already
    /// holds that many records of the record's class.
    Put { table: Table, key: String, record: Record, expect: Expect, quota: Option<u64> },
    /// With `Expect::Any` a missing record is fine; `Present`/`Etag` need it (else `NotFound`).
    Delete { table: Table, key: String, expect: Expect },
}

/// Operations applied together or not at all.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Txn {
    pub ops: Vec<Op>,
}

impl Txn {
    pub fn one(op: Op) -> Txn {
        Txn { ops: vec![op] }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnError {
    NotFound,
    Conflict,
    PreconditionFailed,
    QuotaExceeded,
}

/// On success, the previous value of each op's key.
pub type TxnResult = Result<Vec<Option<Record>>, TxnError>;

/// Key of the by-group registration index: `{group key}\0{registration key}`; with an empty
/// registration key, the prefix of one group's entries.
pub fn by_group_key(group: &str, registration_key: &str) -> String {
    format!("{}\u{0}{registration_key}", dps_core::ids::id_key(group))
}

/// The enrollment group a stored registration state came through (its `_enrollmentGroupId`),
/// which decides its by-group index entry.
pub(crate) fn registration_group(r: &Record) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct GroupOf {
        #[serde(default, rename = "_enrollmentGroupId")]
        group: Option<String>,
    }
    serde_json::from_slice::<GroupOf>(&r.body).ok()?.group
}
