# The bare-metal build (EM_BAREMETAL): the runtime without pthreads, dlopen or files, linked with an
# artifact's kernels.o and kernel table into a firmware ELF for its board.
#   cmake -S . -B build/fw -DCMAKE_TOOLCHAIN_FILE=runtime_c/firmware/arm-none-eabi.cmake \
#         -DEM_BAREMETAL=ON -DEM_FIRMWARE_ARTIFACT=OUT && cmake --build build/fw
if(NOT EM_FIRMWARE_ARTIFACT OR NOT EXISTS ${EM_FIRMWARE_ARTIFACT}/firmware/board.cmake)
  message(FATAL_ERROR "EM_BAREMETAL needs -DEM_FIRMWARE_ARTIFACT=DIR, an edgemoe-compile output for a "
                      "microcontroller target (edgemoe-compile MODEL --target mps3-an547 -o DIR)")
endif()
set(CMAKE_POSITION_INDEPENDENT_CODE OFF) # absolute addresses: no GOT to relocate at reset
get_filename_component(EM_ART ${EM_FIRMWARE_ARTIFACT} ABSOLUTE)
include(${EM_ART}/firmware/board.cmake) # EM_BOARD, EM_CPU_FLAGS

# -fno-if-conversion(2): Debian's GCC 12 turns x / 2.0f under a condition into a conditional
# fixed-point VCVT that the Armv8.1-M assembler rejects. -Wno-format: newlib's uint32_t is long.
add_compile_options(${EM_CPU_FLAGS} -ffunction-sections -fdata-sections -fno-if-conversion -fno-if-conversion2
                    -Wno-format)
add_compile_definitions(EM_BAREMETAL)
include(${CMAKE_CURRENT_LIST_DIR}/../sources.cmake)
set(EM_BAREMETAL_SOURCES ${EM_CORE_SOURCES}
  runtime_c/src/files_flash.c
  runtime_c/src/kernels_static.c
  runtime_c/src/storage_flash.c
  runtime_c/src/thread_pool_serial.c)
add_library(edgemoe_baremetal STATIC ${EM_BAREMETAL_SOURCES})
target_include_directories(edgemoe_baremetal PUBLIC runtime_c/include runtime_c/src)

add_executable(edgemoe_firmware runtime_c/firmware/startup_cortex_m.c runtime_c/firmware/firmware_main.c
               ${EM_ART}/firmware/kernel_table.c ${EM_ART}/kernels.o)
set_target_properties(edgemoe_firmware PROPERTIES SUFFIX ".elf")
target_include_directories(edgemoe_firmware PRIVATE runtime_c/firmware)
target_link_libraries(edgemoe_firmware PRIVATE edgemoe_baremetal m)
target_link_options(edgemoe_firmware PRIVATE ${EM_CPU_FLAGS} -nostartfiles -specs=rdimon.specs
                    -L${EM_ART}/firmware -T${CMAKE_CURRENT_SOURCE_DIR}/runtime_c/firmware/sections.ld
                    -Wl,--gc-sections -Wl,-Map=${CMAKE_CURRENT_BINARY_DIR}/edgemoe_firmware.map)
set_target_properties(edgemoe_firmware PROPERTIES LINK_DEPENDS
                      "${CMAKE_CURRENT_SOURCE_DIR}/runtime_c/firmware/sections.ld;${EM_ART}/firmware/memory.ld")
