//! Calendar dates from the system clock, in the formats Icecast prints (status pages, the admin
//! API, the access log), without a date crate: UTC only, which is what a server's logs and pages
//! should carry anyway.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// A UTC calendar date and time, for the formats Icecast prints.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Date {
    year: i64,
    month: u32,
    day: u32,
    hour: u64,
    minute: u64,
    second: u64,
    /// 0 = Sunday.
    weekday: u64,
}

impl Date {
    pub fn of(t: SystemTime) -> Date {
        let secs = t
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        // Days to a civil date in the proleptic Gregorian calendar (Howard Hinnant's
        // `civil_from_days`), counting in 400-year eras of 146097 days.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Date {
            year,
            month,
            day,
            hour: rem / 3600,
            minute: rem % 3600 / 60,
            second: rem % 60,
            // 1970-01-01 was a Thursday.
            weekday: (days as u64 + 4) % 7,
        }
    }

    /// `Fri, 09 Apr 2021 19:49:50 +0000`, as Icecast's `server_start`.
    pub fn rfc2822(&self) -> String {
        const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
        format!(
            "{}, {:02} {} {} {:02}:{:02}:{:02} +0000",
            DAYS[self.weekday as usize],
            self.day,
            MONTHS[self.month as usize - 1],
            self.year,
            self.hour,
            self.minute,
            self.second
        )
    }

    /// `09/Apr/2021:19:49:50 +0000`, as the common log format (and Icecast's access log) writes
    /// it.
    pub fn clf(&self) -> String {
        format!(
            "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
            self.day,
            MONTHS[self.month as usize - 1],
            self.year,
            self.hour,
            self.minute,
            self.second
        )
    }

    /// `Fri, 09 Apr 2021 19:49:50 GMT`, HTTP's `Date` (RFC 9110, IMF-fixdate).
    pub fn http(&self) -> String {
        self.rfc2822().replace("+0000", "GMT")
    }

    /// `2021-04-09T19:49:50+0000`, as Icecast's `server_start_iso8601`.
    pub fn iso8601(&self) -> String {
        format!(
            "{}-{:02}-{:02}T{:02}:{:02}:{:02}+0000",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

/// `2021-04-09T19:49:50.123Z`, as HLS's `EXT-X-PROGRAM-DATE-TIME` (RFC 3339, milliseconds).
pub(crate) fn rfc3339_millis(t: SystemTime) -> String {
    let d = Date::of(t);
    let millis = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .subsec_millis();
    format!(
        "{}-{:02}-{:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        d.year, d.month, d.day, d.hour, d.minute, d.second
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Date {
        Date::of(UNIX_EPOCH + Duration::from_secs(secs))
    }

    #[test]
    fn dates_print_as_icecast_prints_them() {
        assert_eq!(at(0).rfc2822(), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(at(0).iso8601(), "1970-01-01T00:00:00+0000");
        assert_eq!(at(951_782_400).rfc2822(), "Tue, 29 Feb 2000 00:00:00 +0000");
        assert_eq!(
            at(1_700_000_000).rfc2822(),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
        assert_eq!(at(1_700_000_000).iso8601(), "2023-11-14T22:13:20+0000");
        assert_eq!(at(1_700_000_000).clf(), "14/Nov/2023:22:13:20 +0000");
        assert_eq!(at(1_700_000_000).http(), "Tue, 14 Nov 2023 22:13:20 GMT");
        assert_eq!(at(4_107_542_399).iso8601(), "2100-02-28T23:59:59+0000");
        assert_eq!(at(4_107_542_400).iso8601(), "2100-03-01T00:00:00+0000");
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_042);
        assert_eq!(rfc3339_millis(t), "2023-11-14T22:13:20.042Z");
    }
}
