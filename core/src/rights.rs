//! Shared access policy rights (docs/service-api.md §3.1).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Rights(u8);

impl Rights {
    pub const SERVICE_CONFIG: Rights = Rights(1);
    pub const ENROLLMENT_READ: Rights = Rights(2);
    pub const ENROLLMENT_WRITE: Rights = Rights(4);
    pub const DEVICE_CONNECT: Rights = Rights(8);
    pub const REGISTRATION_STATUS_READ: Rights = Rights(16);
    pub const REGISTRATION_STATUS_WRITE: Rights = Rights(32);
    pub const ALL: Rights = Rights(63);

    const NAMES: [(&'static str, Rights); 6] = [
        ("ServiceConfig", Rights::SERVICE_CONFIG),
        ("EnrollmentRead", Rights::ENROLLMENT_READ),
        ("EnrollmentWrite", Rights::ENROLLMENT_WRITE),
        ("DeviceConnect", Rights::DEVICE_CONNECT),
        ("RegistrationStatusRead", Rights::REGISTRATION_STATUS_READ),
        ("RegistrationStatusWrite", Rights::REGISTRATION_STATUS_WRITE),
    ];

    pub fn contains(self, other: Rights) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn union(self, other: Rights) -> Rights {
        Rights(self.0 | other.0)
    }

    /// Parses `"EnrollmentRead, EnrollmentWrite"` (comma-separated, case-insensitive).
    pub fn parse(s: &str) -> Option<Rights> {
        let mut r = Rights::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (_, bit) = Rights::NAMES.iter().find(|(n, _)| n.eq_ignore_ascii_case(part))?;
            r = r.union(*bit);
        }
        Some(r)
    }

    pub fn name_of(r: Rights) -> &'static str {
        Rights::NAMES.iter().find(|(_, b)| *b == r).map(|(n, _)| *n).unwrap_or("unknown")
    }

    pub fn render(self) -> String {
        Rights::NAMES.iter().filter(|(_, b)| self.contains(*b)).map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_render() {
        let r = Rights::parse("enrollmentread, EnrollmentWrite").unwrap();
        assert!(r.contains(Rights::ENROLLMENT_READ) && r.contains(Rights::ENROLLMENT_WRITE));
        assert!(!r.contains(Rights::SERVICE_CONFIG));
        assert_eq!(r.render(), "EnrollmentRead, EnrollmentWrite");
        assert!(Rights::parse("Everything").is_none());
        assert_eq!(Rights::parse(&Rights::ALL.render()), Some(Rights::ALL));
    }
}
