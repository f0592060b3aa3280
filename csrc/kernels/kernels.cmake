target_sources(vivace_native PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/cpu_features.cpp
  ${CMAKE_CURRENT_LIST_DIR}/mlp.cpp
  ${CMAKE_CURRENT_LIST_DIR}/mlp_portable.cpp
  ${CMAKE_CURRENT_LIST_DIR}/mlp_avx2.cpp
  ${CMAKE_CURRENT_LIST_DIR}/mlp_avx512.cpp
  ${CMAKE_CURRENT_LIST_DIR}/mlp_amx.cpp
)

# Per-file ISA flags: only the level files get wide instructions; the dispatcher
# (cpu_features.cpp) picks a level at run time, so the library runs on any x86-64 CPU.
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  set_source_files_properties(${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/mlp_avx2.cpp
    PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma")
  set_source_files_properties(${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/mlp_avx512.cpp
    PROPERTIES COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512vnni;-mavx2;-mfma")
  set_source_files_properties(${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/mlp_amx.cpp
    PROPERTIES COMPILE_OPTIONS "-mamx-tile;-mamx-int8;-mavx512f;-mavx512bw;-mavx512vl;-mavx512vnni;-mavx2;-mfma")
endif()

# Native stress test (run by the sanitizer builds).
if(VIVACE_BUILD_TESTS)
  add_executable(kernels_test ${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/tests/kernels_test.cpp)
  target_link_libraries(kernels_test PRIVATE vivace_native)
  target_compile_options(kernels_test PRIVATE ${VIVACE_WARNINGS} ${VIVACE_SAN_FLAGS})
endif()

# LD_PRELOAD library for `vivace bench kernels --emulate-cpu avx2` (cpu_emulation.c); no
# Python in it, installed next to _core by setup.py.
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64" AND CMAKE_SYSTEM_NAME STREQUAL "Linux")
  add_library(_cpu_emulation MODULE ${CMAKE_CURRENT_SOURCE_DIR}/csrc/kernels/cpu_emulation.c)
  set_target_properties(_cpu_emulation PROPERTIES PREFIX "" C_STANDARD 11)
  target_compile_options(_cpu_emulation PRIVATE ${VIVACE_WARNINGS})
  target_link_libraries(_cpu_emulation PRIVATE ${CMAKE_DL_LIBS})
endif()
