//! UTC timestamps in the form DPS emits: `2022-07-05T21:27:16.8123235Z` (7 fractional digits,
//! trailing `Z`; the Java SDK splits on `.` and `Z`, so no offsets). docs/service-api.md §2.10.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// Nanoseconds since the Unix epoch, UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcTime(i128);

impl UtcTime {
    pub fn from_unix_nanos(n: i128) -> Self {
        UtcTime(n)
    }
    pub fn from_unix_secs(s: i64) -> Self {
        UtcTime(s as i128 * 1_000_000_000)
    }
    pub fn unix_nanos(self) -> i128 {
        self.0
    }
    pub fn unix_secs(self) -> i64 {
        (self.0.div_euclid(1_000_000_000)) as i64
    }
    pub fn parse(s: &str) -> Option<Self> {
        let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
        Some(UtcTime(t.unix_timestamp_nanos()))
    }
}

impl fmt::Display for UtcTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match time::OffsetDateTime::from_unix_timestamp_nanos(self.0) {
            Ok(t) => write!(
                f,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:07}Z",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second(),
                t.nanosecond() / 100
            ),
            Err(_) => write!(f, "1970-01-01T00:00:00.0000000Z"),
        }
    }
}

impl Serialize for UtcTime {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for UtcTime {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        UtcTime::parse(&s).ok_or_else(|| serde::de::Error::custom("invalid date-time"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_seven_digits_and_z() {
        let t = UtcTime::from_unix_nanos(1_657_056_436_812_323_500);
        assert_eq!(t.to_string(), "2022-07-05T21:27:16.8123235Z");
        assert_eq!(UtcTime::parse(&t.to_string()), Some(t));
    }
}
