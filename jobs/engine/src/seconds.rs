//! Durations given as settings, in seconds, each with the range it may take.

use std::time::Duration;

/// The values a duration setting may take, in seconds (both ends included).
///
/// Settings outside their range parse (they are numbers) but break things
/// later: a poll interval of 0 panicked a timer, a lease of 0 made workers
/// take each other's jobs at every heartbeat, a lease of 1e15 s overflowed
/// Postgres's timestamps. So every duration setting names its range, the
/// command line refuses a value outside it at parse time, and
/// [`crate::WorkerConfig::check`] refuses one set in code.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SecondsRange {
    /// The least value, in seconds.
    pub min: f64,
    /// The greatest value, in seconds.
    pub max: f64,
}

impl SecondsRange {
    /// From `min` to `max` seconds.
    pub const fn new(min: f64, max: f64) -> Self {
        Self { min, max }
    }

    /// What the range allows, for messages: `a number of seconds from 0.01 to 3600`.
    pub fn describe(&self) -> String {
        format!("a number of seconds from {} to {}", self.min, self.max)
    }

    /// Parses `value` (seconds, e.g. `2.5`) and checks it is in range.
    pub fn parse(&self, value: &str) -> Result<Duration, String> {
        let seconds: f64 = value
            .trim()
            .parse()
            .map_err(|_| format!("must be {}", self.describe()))?;
        if !(self.min..=self.max).contains(&seconds) {
            return Err(format!("must be {}", self.describe()));
        }
        Duration::try_from_secs_f64(seconds).map_err(|_| format!("must be {}", self.describe()))
    }

    /// A clap value parser for this range.
    pub fn parser(
        self,
    ) -> impl Fn(&str) -> Result<Duration, String> + Clone + Send + Sync + 'static {
        move |value| self.parse(value)
    }

    /// Checks a duration set in code: `Err` names `setting`, the value and the range.
    pub fn check(&self, setting: &str, value: Duration) -> Result<(), String> {
        let seconds = value.as_secs_f64();
        if (self.min..=self.max).contains(&seconds) {
            return Ok(());
        }
        Err(format!(
            "{setting}={seconds} is out of range: it must be {}",
            self.describe()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_outside_the_range_and_non_numbers_are_refused() {
        let range = SecondsRange::new(0.01, 3600.0);
        assert_eq!(range.parse("2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(range.parse("3600"), Ok(Duration::from_secs(3600)));
        for bad in ["0", "-1", "3600.5", "1e15", "NaN", "inf", "soon", ""] {
            assert_eq!(
                range.parse(bad),
                Err("must be a number of seconds from 0.01 to 3600".to_owned()),
                "{bad:?}"
            );
        }
        assert!(range.check("JOB_LEASE", Duration::ZERO).is_err());
        assert!(range.check("JOB_LEASE", Duration::from_secs(1)).is_ok());
    }
}
