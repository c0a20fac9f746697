//! Progress of long work as the command shows it: a bar with rate and ETA on a terminal,
//! the engine's log lines otherwise.

use crate::engine::{LogProgress, Progress};
use std::io::IsTerminal;
use std::sync::Arc;

/// A bar on stderr (indicatif).
pub struct Bar {
    bar: indicatif::ProgressBar,
}

impl Progress for Bar {
    fn start(&self, what: &str, total: u64) {
        self.bar.reset();
        self.bar.set_length(total);
        self.bar.set_message(what.to_string());
    }
    fn advance(&self, done: u64) {
        self.bar.set_position(done);
    }
    fn finish(&self) {
        self.bar.finish();
    }
}

/// A bar when stderr is a terminal, log lines otherwise.
pub fn for_terminal() -> Arc<dyn Progress> {
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} docs, {per_sec}, ETA {eta}")
                .expect("valid template"),
        );
        Arc::new(Bar { bar })
    } else {
        Arc::new(LogProgress::default())
    }
}
