//! Everything `ctl` prints on stdout goes through `outln!`: a reader that
//! went away (`ctl history | head -1`, a closed `watch` pipe) ends `ctl`
//! quietly with exit 0 instead of a panic. It also notes that something
//! was printed, so that a failure with `--output json` prints its error
//! document only where no other document was printed.

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Something was printed on stdout: with `--output json`, the document an
/// error would otherwise be.
static PRINTED: AtomicBool = AtomicBool::new(false);

/// Whether anything was printed on stdout yet.
pub fn printed() -> bool {
    PRINTED.load(Ordering::Relaxed)
}

/// `println!` that stops `ctl` quietly when stdout is closed.
macro_rules! outln {
    () => {
        $crate::out::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}

pub fn line(args: std::fmt::Arguments) {
    PRINTED.store(true, Ordering::Relaxed);
    let mut stdout = std::io::stdout().lock();
    let written = stdout
        .write_fmt(args)
        .and_then(|()| stdout.write_all(b"\n"))
        .and_then(|()| stdout.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("ctl: error: cannot write to stdout: {e}");
            std::process::exit(1);
        }
    }
}
