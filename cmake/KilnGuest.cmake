# kiln_add_guest(): builds freestanding static x86-64 guest ELFs with the host C compiler.
#
#   kiln_add_guest(NAME SOURCES <files...> [MUSL])
#
# produces ${KILN_GUEST_DIR}/NAME.elf (target kiln_guest_NAME), linked at 1 MiB with
# guest/lib/guest.ld and the guest library (target kiln_guest_lib, linked whole so its malloc,
# mem*/str* and libc hooks always win over libc.a's). MUSL adds Debian's musl-dev headers and
# static libc.a for snprintf/strtod/math. Guest names are collected in the global property
# KILN_GUEST_NAMES; guest/CMakeLists.txt makes the `kiln_guests` target depend on all of them.
#
# Guest targets take none of the host's settings: they never link kiln_host_options
# (sanitizers, warnings), and the flags below come after CMAKE_C_FLAGS[_<CONFIG>] on the command
# line, so -O2 wins over a build type's -O3, and -fno-sanitize=all, -fno-lto, -fno-pie undo
# anything global. A build type's -g only adds debug sections, which are never loaded.
include_guard(GLOBAL)

set(KILN_GUEST_DIR ${CMAKE_BINARY_DIR}/guests)
set(KILN_GUEST_LINKER_SCRIPT ${CMAKE_CURRENT_LIST_DIR}/../guest/lib/guest.ld)
set(KILN_GUEST_MUSL_INCLUDE /usr/include/x86_64-linux-musl CACHE PATH "musl headers for MUSL guests")
set(KILN_GUEST_MUSL_LIBC /usr/lib/x86_64-linux-musl/libc.a CACHE FILEPATH "musl libc.a for MUSL guests")
execute_process(COMMAND ${CMAKE_C_COMPILER} -print-file-name=include
  OUTPUT_VARIABLE KILN_GUEST_CC_INCLUDE OUTPUT_STRIP_TRAILING_WHITESPACE)

# The flags that produced working guests (notes/emulated-backend.md), plus: -fno-sanitize=all
# and -fno-lto against global settings; -fstack-clash-protection so a large stack frame probes
# page by page and hits the guard page below the stack instead of jumping over it; section
# splitting so --gc-sections drops what a guest does not use.
set(KILN_GUEST_C_FLAGS
  -O2 -ffreestanding -fno-pic -fno-pie -mno-red-zone -mcmodel=small -fno-stack-protector
  -fno-asynchronous-unwind-tables -fno-unwind-tables -fcf-protection=none -mno-avx -fno-builtin
  -nostdinc -fno-sanitize=all -fno-lto -fstack-clash-protection -ffunction-sections
  -fdata-sections -Wall -Wextra)
set(KILN_GUEST_LINK_FLAGS
  -nostdlib -static -no-pie -fno-sanitize=all -fno-lto
  -Wl,-T,${KILN_GUEST_LINKER_SCRIPT} -Wl,--build-id=none -Wl,-z,noexecstack
  -Wl,-z,max-page-size=4096 -Wl,--gc-sections)

# Compile settings shared by the guest library and every guest. The compiler's own include dir
# is passed as a raw option: CMake drops "implicit" include directories from
# target_include_directories, and with -nostdinc it must be on the command line.
function(_kiln_guest_compile_settings target musl)
  set(system_includes)
  if(musl)
    list(APPEND system_includes "SHELL:-isystem ${KILN_GUEST_MUSL_INCLUDE}")
  endif()
  list(APPEND system_includes "SHELL:-isystem ${KILN_GUEST_CC_INCLUDE}")
  target_compile_options(${target} PRIVATE ${KILN_GUEST_C_FLAGS} ${system_includes}
    $<$<BOOL:${KILN_WERROR}>:-Werror>)
  target_include_directories(${target} PRIVATE
    ${PROJECT_BINARY_DIR}/layers/guest ${CMAKE_CURRENT_FUNCTION_LIST_DIR}/../guest/lib)
  set_target_properties(${target} PROPERTIES
    C_STANDARD 11 C_STANDARD_REQUIRED ON C_EXTENSIONS ON
    POSITION_INDEPENDENT_CODE OFF INTERPROCEDURAL_OPTIMIZATION OFF)
endfunction()

# The guest library (called once, from guest/CMakeLists.txt).
function(kiln_add_guest_library)
  cmake_parse_arguments(ARG "" "" "SOURCES" ${ARGN})
  add_library(kiln_guest_lib STATIC ${ARG_SOURCES})
  _kiln_guest_compile_settings(kiln_guest_lib FALSE)
  # string.c's copy loops must not be recognised as memcpy/memset and turned into calls to
  # themselves; harmless elsewhere in the library.
  target_compile_options(kiln_guest_lib PRIVATE -fno-tree-loop-distribute-patterns)
  set_target_properties(kiln_guest_lib PROPERTIES OUTPUT_NAME kiln_guest)
endfunction()

function(kiln_add_guest name)
  cmake_parse_arguments(ARG "MUSL" "" "SOURCES" ${ARGN})
  if(NOT ARG_SOURCES)
    message(FATAL_ERROR "kiln_add_guest(${name}): SOURCES is required")
  endif()
  if(NOT TARGET kiln_guest_lib)
    message(FATAL_ERROR "kiln_add_guest(${name}): the guest library is not defined yet")
  endif()
  if(ARG_MUSL AND NOT EXISTS ${KILN_GUEST_MUSL_LIBC})
    message(FATAL_ERROR "kiln_add_guest(${name} MUSL): ${KILN_GUEST_MUSL_LIBC} not found "
      "(install Debian's musl-dev)")
  endif()
  set(target kiln_guest_${name})
  add_executable(${target} ${ARG_SOURCES})
  _kiln_guest_compile_settings(${target} "${ARG_MUSL}")
  target_link_options(${target} PRIVATE ${KILN_GUEST_LINK_FLAGS})
  # Link order: the guest's objects, the whole guest library, musl's libc.a, libgcc last (for
  # the helpers both may call).
  target_link_libraries(${target} PRIVATE "$<LINK_LIBRARY:WHOLE_ARCHIVE,kiln_guest_lib>")
  if(ARG_MUSL)
    target_link_libraries(${target} PRIVATE ${KILN_GUEST_MUSL_LIBC})
  endif()
  target_link_libraries(${target} PRIVATE gcc)
  set_target_properties(${target} PROPERTIES
    OUTPUT_NAME ${name} SUFFIX .elf
    RUNTIME_OUTPUT_DIRECTORY ${KILN_GUEST_DIR}
    LINK_DEPENDS ${KILN_GUEST_LINKER_SCRIPT})
  set_property(GLOBAL APPEND PROPERTY KILN_GUEST_NAMES ${name})
endfunction()
