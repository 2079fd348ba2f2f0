# Cross-compiling kvq for 64-bit Arm Linux on a Debian/Ubuntu x86-64 host, to check that
# the portable kernels build for NEON/SVE and to run the tests under QEMU
# (scripts/test-aarch64.sh does all of the below):
#   sudo dpkg --add-architecture arm64 && sudo apt-get update
#   sudo apt-get install g++-aarch64-linux-gnu qemu-user \
#        libhwy-dev:arm64 libfmt-dev:arm64 libgtest-dev:arm64
#   cmake -B build/aarch64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake -DKVQ_BUILD_BENCH=OFF
#   cmake --build build/aarch64 -j$(nproc) --target kvq_tests
#   build/aarch64/tests/kvq_tests is then run through the emulator below, e.g.
#   qemu-aarch64 /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 --library-path \
#     /usr/aarch64-linux-gnu/lib:/usr/lib/aarch64-linux-gnu build/aarch64/tests/kvq_tests --gtest_filter='Attention*'
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
# Debian's multiarch layout: the arm64 libraries and their CMake packages live in
# /usr/lib/aarch64-linux-gnu.
set(CMAKE_LIBRARY_ARCHITECTURE aarch64-linux-gnu)
# The dynamic loader is named explicitly: with `qemu-aarch64 -L <sysroot>` instead, a
# program that starts a thread hung at join (QEMU 7.2, Debian 12).
set(CMAKE_CROSSCOMPILING_EMULATOR qemu-aarch64 /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 --library-path
    /usr/aarch64-linux-gnu/lib:/usr/lib/aarch64-linux-gnu)
