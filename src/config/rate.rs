//! `Rate`: a rate-limit setting such as `10/m` (`RATE_LIMIT_*`), its parsing and display,
//! and why a rate string is refused.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A rate limit such as `10/m`: at most `count` events per `period`.
///
/// Parsed from `COUNT/UNIT`, where `COUNT` ≥ 1 and `UNIT` is one of `s`, `m`,
/// `h`, `d`; displayed the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    /// Events allowed per period (≥ 1).
    pub count: u32,
    /// Length of the window.
    pub period: Duration,
}

/// Why a rate string was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// Not of the form `COUNT/UNIT`, or `COUNT` is not a whole number.
    #[error("must be COUNT/UNIT, e.g. 10/m (UNIT one of s, m, h, d)")]
    Format,
    /// `COUNT` is zero.
    #[error("count must be at least 1")]
    ZeroCount,
    /// `UNIT` is not one of `s`, `m`, `h`, `d`.
    #[error("unit must be one of s, m, h, d")]
    Unit,
}

impl Rate {
    /// `count` events per second.
    pub const fn per_second(count: u32) -> Self {
        Self {
            count,
            period: Duration::from_secs(1),
        }
    }
    /// `count` events per minute.
    pub const fn per_minute(count: u32) -> Self {
        Self {
            count,
            period: Duration::from_secs(60),
        }
    }
    /// `count` events per hour.
    pub const fn per_hour(count: u32) -> Self {
        Self {
            count,
            period: Duration::from_secs(3600),
        }
    }
    /// `count` events per day.
    pub const fn per_day(count: u32) -> Self {
        Self {
            count,
            period: Duration::from_secs(86_400),
        }
    }
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (count, unit) = s.trim().split_once('/').ok_or(RateError::Format)?;
        if count.is_empty() || !count.bytes().all(|b| b.is_ascii_digit()) {
            return Err(RateError::Format);
        }
        let count: u32 = count.parse().map_err(|_| RateError::Format)?;
        if count == 0 {
            return Err(RateError::ZeroCount);
        }
        match unit {
            "s" => Ok(Self::per_second(count)),
            "m" => Ok(Self::per_minute(count)),
            "h" => Ok(Self::per_hour(count)),
            "d" => Ok(Self::per_day(count)),
            _ => Err(RateError::Unit),
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match (self.period.as_secs(), self.period.subsec_nanos()) {
            (1, 0) => "s",
            (60, 0) => "m",
            (3600, 0) => "h",
            (86_400, 0) => "d",
            _ => return write!(f, "{}/{:?}", self.count, self.period),
        };
        write!(f, "{}/{unit}", self.count)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_and_display_in_every_unit() {
        for (s, secs) in [("1/s", 1), ("10/m", 60), ("5/h", 3600), ("7/d", 86_400)] {
            let rate: Rate = s.parse().unwrap();
            assert_eq!(rate.period, Duration::from_secs(secs));
            assert_eq!(rate.to_string(), s);
        }
        assert_eq!("0/m".parse::<Rate>(), Err(RateError::ZeroCount));
        assert_eq!("10/w".parse::<Rate>(), Err(RateError::Unit));
        assert_eq!("10".parse::<Rate>(), Err(RateError::Format));
        assert_eq!("x/m".parse::<Rate>(), Err(RateError::Format));
    }
}
