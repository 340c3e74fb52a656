//! Loading a release from the descriptor it was hashed through
//! (`nine9s_host::Library::open_file`), in this process with the real host
//! crate and the sample libraries: bytes renamed over the path after the
//! file was opened are not what loads, and a descriptor number reused by a
//! second library loads that library, not the first one still mapped.
//! One test function: the second check needs the process's lowest free
//! descriptor number not to move under it.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use nine9s_host::Library;
use nine9s_tests::library;

/// Whether this process maps the file at `path` (`/proc/self/maps` names
/// a mapping by the path it was opened under).
fn is_mapped(path: &Path) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    let wanted = path.to_string_lossy();
    maps.lines().any(|line| {
        let line = line.trim_end();
        line.strip_suffix(" (deleted)")
            .unwrap_or(line)
            .ends_with(wanted.as_ref())
    })
}

/// `src` copied to `dst` (a file of its own, as an artifact is).
fn copy(src: &str, dst: &Path) {
    std::fs::copy(library(src), dst).expect("copy a sample library");
}

fn open(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_o_nofollow())
        .open(path)
        .expect("open the library")
}

/// O_NOFOLLOW on Linux (the tests crate has no libc of its own).
fn libc_o_nofollow() -> i32 {
    0o400000
}

#[test]
fn loads_the_descriptor_not_the_path_nor_an_old_library_of_the_same_name() {
    let dir = tempfile::tempdir().unwrap();

    // Opened (as if hashed), then other bytes renamed over the path.
    let artifact = dir.path().join("artifact.so");
    copy("nine9s_0_1_0", &artifact);
    let hashed = open(&artifact);
    let number = hashed.as_raw_fd();
    let swapped = dir.path().join("swapped.so");
    copy("nine9s_0_2_0", &swapped);
    std::fs::rename(&swapped, &artifact).unwrap();
    let first = Library::open_file(hashed.into()).expect("load the opened file");
    assert_eq!(
        first.version(),
        "0.1.0",
        "the bytes renamed over the path were loaded"
    );
    assert!(
        is_mapped(first.path()),
        "/proc/self/maps names the loaded file by its path: {}",
        first.path().display()
    );

    // The first library stays loaded; its descriptor was closed, so the
    // next file opened gets the same number.
    let other = dir.path().join("other.so");
    copy("nine9s_0_3_0", &other);
    let reused = open(&other);
    assert_eq!(
        reused.as_raw_fd(),
        number,
        "the descriptor number was not reused; this check needs it to be"
    );
    let second = Library::open_file(reused.into()).expect("load the second file");
    assert_eq!(
        second.version(),
        "0.3.0",
        "the library loaded first under the same descriptor name came back"
    );
    assert_eq!(first.version(), "0.1.0");

    // Unloading is still told by path.
    let second_path = second.path().to_owned();
    assert!(is_mapped(&second_path));
    drop(second);
    assert!(
        !is_mapped(&second_path) || nine9s_host::lingering().contains(&second_path),
        "a released library is either unmapped or reported lingering"
    );
}
