//! Wall-clock time as milliseconds since the Unix epoch, the unit every
//! tower-redis entry stores in Redis.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    epoch_ms(SystemTime::now())
}

/// Milliseconds between the Unix epoch and `time`: 0 for a time before the
/// epoch, `u64::MAX` for one too far after it.
pub fn epoch_ms(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, duration_ms)
}

/// A duration in whole milliseconds, `u64::MAX` when it does not fit.
pub fn duration_ms(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_ms_counts_from_1970_and_saturates_at_both_ends() {
        assert_eq!(epoch_ms(UNIX_EPOCH), 0);
        assert_eq!(epoch_ms(UNIX_EPOCH + Duration::from_millis(1_500)), 1_500);
        assert_eq!(epoch_ms(UNIX_EPOCH - Duration::from_secs(1)), 0);
        assert_eq!(duration_ms(Duration::MAX), u64::MAX);
        assert_eq!(duration_ms(Duration::from_micros(2_999)), 2);
    }

    #[test]
    fn now_ms_is_after_2020_and_does_not_go_backwards_in_a_test() {
        let first = now_ms();
        assert!(first > 1_577_836_800_000, "{first}");
        assert!(now_ms() >= first);
    }
}
