# Sourced by the GPU scripts: Debian .debs carried in .deps/ (gtest, CLI11, nlohmann-json,
# cpp-httplib, OpenBLAS, PCRE2, pkgconf, Highway: `apt-get download libhwy-dev libhwy1`) are unpacked to
# /opt/deps when the machine lacks them (the device machine has no package access), and the build
# is pointed at them: CMAKE_PREFIX_PATH finds Highway's CMake package (hwy::hwy, headers in
# /opt/deps/usr/include), and the binaries and libcca.so carry /opt/deps/usr/lib/x86_64-linux-gnu
# in their build RUNPATH, so Python (run with ORIG_LD) loads libhwy.so.1 too. Sets ORIG_LD (the
# library path before, for Python) and PREFIX (extra CMake arguments).
ORIG_LD=${LD_LIBRARY_PATH:-}
PREFIX=""
if ls .deps/*.deb >/dev/null 2>&1; then
  mkdir -p /opt/deps
  for f in .deps/*.deb; do dpkg -x "$f" /opt/deps; done
  export PKG_CONFIG_PATH=/opt/deps/usr/lib/x86_64-linux-gnu/pkgconfig:/opt/deps/usr/lib/x86_64-linux-gnu/openblas-pthread/pkgconfig:${PKG_CONFIG_PATH:-}
  export LD_LIBRARY_PATH=/opt/deps/usr/lib/x86_64-linux-gnu:/opt/deps/usr/lib/x86_64-linux-gnu/openblas-pthread:${LD_LIBRARY_PATH:-}
  command -v pkg-config >/dev/null || export PKG_CONFIG=/opt/deps/usr/bin/pkgconf
  export PKG_CONFIG_SYSROOT_DIR=/opt/deps
  PREFIX="-DCMAKE_PREFIX_PATH=/opt/deps/usr"
  [ -n "${PKG_CONFIG:-}" ] && PREFIX="$PREFIX -DPKG_CONFIG_EXECUTABLE=$PKG_CONFIG"
fi
