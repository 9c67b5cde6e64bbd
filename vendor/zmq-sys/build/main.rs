// zbroker's copy of zmq-sys 0.12.0's build script. Upstream builds the
// bundled libzmq with `with_libsodium(None)`, i.e. without CURVE. Here libzmq
// is built against the libsodium that the `libsodium-sys-stable` crate
// compiles from the source tarball it ships (./configure && make: needs only
// sh, make and a C compiler; nothing is downloaded).
//
// libsodium-sys-stable declares `links = "sodium"` and prints
// `cargo:include=` / `cargo:lib=`, which cargo hands to the build scripts of
// crates that depend on it (as a normal dependency) as DEP_SODIUM_INCLUDE and
// DEP_SODIUM_LIB.

use std::env;
use std::path::{Path, PathBuf};

fn dep_dir(var: &str) -> PathBuf {
    println!("cargo:rerun-if-env-changed={var}");
    match env::var_os(var) {
        Some(dir) => PathBuf::from(dir),
        None => panic!(
            "{} is not set: libsodium-sys-stable did not report where it built \
             libsodium. This happens when SODIUM_LIB_DIR is set; unset it (and \
             SODIUM_USE_PKG_CONFIG) so that libsodium is built from the crate's source.",
            var
        ),
    }
}

/// The `build` directory of this cargo invocation (OUT_DIR is
/// `<target>/<profile>/build/zmq-sys-<hash>/out`).
fn cargo_build_dir() -> PathBuf {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    out_dir
        .ancestors()
        .nth(2)
        .expect("OUT_DIR has the form <build dir>/<pkg>-<hash>/out")
        .to_path_buf()
}

pub fn configure() {
    println!("cargo:rerun-if-changed=build/main.rs");
    println!("cargo:rerun-if-env-changed=PROFILE");
    // libsodium-sys-stable silently uses a system libsodium under these.
    println!("cargo:rerun-if-env-changed=SODIUM_USE_PKG_CONFIG");
    println!("cargo:rerun-if-env-changed=SODIUM_LIB_DIR");

    let include_dir = dep_dir("DEP_SODIUM_INCLUDE");
    let lib_dir = dep_dir("DEP_SODIUM_LIB");

    // Insist on the libsodium built from the crate's bundled source, so that a
    // build never depends on what happens to be installed on the machine.
    let build_dir = cargo_build_dir();
    let canon = |p: &Path| p.canonicalize().unwrap_or_else(|_| p.to_path_buf());
    if !canon(&lib_dir).starts_with(canon(&build_dir)) {
        panic!(
            "libsodium-sys-stable reports libsodium in {} (outside cargo's build \
             directory {}): a system libsodium (SODIUM_USE_PKG_CONFIG or the \
             use-pkg-config feature?) would be linked. zbroker builds libzmq only \
             against the libsodium compiled from libsodium-sys-stable's source.",
            lib_dir.display(),
            build_dir.display()
        );
    }
    assert!(
        lib_dir.join("libsodium.a").is_file() || lib_dir.join("libsodium.lib").is_file(),
        "no static libsodium in {}",
        lib_dir.display()
    );
    assert!(
        include_dir.join("sodium.h").is_file(),
        "no sodium.h in {}",
        include_dir.display()
    );

    // Note that by default `libzmq` builds without `libsodium` by instead
    // relying on `tweetnacl`. However since this `tweetnacl` [has never been
    // audited nor is ready for production](https://github.com/zeromq/libzmq/issues/3006),
    // we link against `libsodium` to enable `ZMQ_CURVE`.
    //
    // zeromq-src 0.2.6 prints the libsodium search path Debug-quoted (an
    // unusable path); libsodium-sys-stable's own `rustc-link-search` is what
    // actually finds libsodium.a. Print the right one here as well.
    println!("cargo:rustc-link-search=native={}", lib_dir.display());

    // Cargo shows the C++ compiler's warnings for a path dependency (it hides
    // them for crates.io ones): silence libzmq's own, as upstream use does.
    // `cc` adds these flags to whatever CFLAGS/CXXFLAGS the user set.
    let target = env::var("TARGET").expect("TARGET").replace('-', "_");
    for var in ["CFLAGS", "CXXFLAGS"] {
        let name = format!("{var}_{target}");
        let mut flags = env::var(&name).unwrap_or_default();
        flags.push_str(" -w");
        env::set_var(&name, flags.trim_start());
    }

    zeromq_src::Build::new()
        .with_libsodium(Some(zeromq_src::LibLocation::new(lib_dir, include_dir)))
        .build();
}

fn main() {
    configure()
}
