# CMake toolchain for Cortex-M firmware with Debian's gcc-arm-none-eabi and newlib
# (cmake -DCMAKE_TOOLCHAIN_FILE=runtime_c/firmware/arm-none-eabi.cmake -DEM_BAREMETAL=ON ...).
set(CMAKE_SYSTEM_NAME Generic)
set(CMAKE_SYSTEM_PROCESSOR arm)
set(CMAKE_C_COMPILER arm-none-eabi-gcc)
set(CMAKE_TRY_COMPILE_TARGET_TYPE STATIC_LIBRARY) # no OS to link a test program for
