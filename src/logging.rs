//! The daemon's log: to stderr, and when stderr is the systemd journal
//! (`JOURNAL_STREAM` set, as systemd does for a service), each line starts
//! with its syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>`
//! debug and trace) so `journalctl -p warning` finds the warnings, and
//! without a timestamp (the journal keeps its own).

#![forbid(unsafe_code)]

use std::fmt;
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// Prefixes every event with its syslog priority, then formats it as `F`.
pub struct JournalPriority<F>(pub F);

/// The syslog priority of a tracing level.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

impl<S, N, F> FormatEvent<S, N> for JournalPriority<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Sets up the process's log (`RUST_LOG` filters, `info` by default).
pub fn init() {
    let filter = || tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .event_format(JournalPriority(tracing_subscriber::fmt::format().without_time()))
            .init();
    } else {
        tracing_subscriber::fmt()
            .with_env_filter(filter())
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn journal_lines_carry_their_priority() {
        let buf = Buf::default();
        let b2 = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || b2.clone())
            .with_ansi(false)
            .event_format(JournalPriority(tracing_subscriber::fmt::format().without_time()))
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!("a host fault");
            tracing::info!("opened");
            tracing::error!("broken");
        });
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].starts_with("<4>") && lines[0].contains("a host fault"), "{text}");
        assert!(lines[1].starts_with("<6>"), "{text}");
        assert!(lines[2].starts_with("<3>"), "{text}");
    }
}
