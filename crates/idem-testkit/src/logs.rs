//! Log capture: a tracing subscriber that writes formatted lines (no colours) into a
//! shared buffer a test reads back, to assert what idem logged.

use std::io::Write;
use std::sync::{Arc, Mutex};

/// A buffer that collects the lines of a tracing `fmt` subscriber. Clones share the
/// buffer.
#[derive(Clone, Debug, Default)]
pub struct LogCapture(Arc<Mutex<Vec<u8>>>);

impl LogCapture {
    /// Captures what is logged at `warn` and above on this thread while the guard
    /// lives (a current-thread runtime's tasks included).
    pub fn install(&self) -> tracing::subscriber::DefaultGuard {
        let sink = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::WARN)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    /// Captures, from every thread for the rest of the process, what the
    /// `EnvFilter` directives `filter` let through (`"warn"`, `"sqlx::query=debug"`).
    /// Panics if the process already has a global subscriber.
    pub fn install_global(&self, filter: &str) {
        let sink = self.clone();
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .init();
    }

    /// Everything captured so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// The captured lines.
    pub fn lines(&self) -> Vec<String> {
        self.text().lines().map(str::to_owned).collect()
    }

    /// The captured lines that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
