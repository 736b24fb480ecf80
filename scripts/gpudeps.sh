# gpudeps.sh: sourced by the device scripts (gpu.sh, gpu-multi.sh). Where the machine lacks the
# Debian packages the build and the binaries need (libcjson, libpcre2, libmicrohttpd), unpacks the
# .debs carried in .gpudeps/ under /tmp/m3-gpudeps and points the compiler, pkg-config and the
# loader at them. Needs $src (the checkout).
if ! pkg-config --exists libcjson libpcre2-8 libmicrohttpd 2>/dev/null; then
  deps=/tmp/m3-gpudeps
  for f in "$src"/.gpudeps/*.deb; do dpkg -x "$f" "$deps"; done
  # libmicrohttpd.pc requires gnutls.pc; the runtime libgnutls.so.30 is the machine's own.
  printf 'Name: gnutls\nDescription: the system runtime\nVersion: 3.8.0\n' \
    > "$deps/usr/lib/x86_64-linux-gnu/pkgconfig/gnutls.pc"
  export PATH=$deps/usr/bin:$PATH CPATH=$deps/usr/include
  export LD_LIBRARY_PATH=$deps/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}
  export PKG_CONFIG_SYSROOT_DIR=$deps
  export PKG_CONFIG_LIBDIR=$deps/usr/lib/x86_64-linux-gnu/pkgconfig:$deps/usr/share/pkgconfig
fi
