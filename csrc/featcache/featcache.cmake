target_sources(vivace_native PRIVATE ${CMAKE_CURRENT_LIST_DIR}/featcache.cpp)

# The feature cache reads the LMDB online store that py-lmdb writes. LMDB is built from
# the vendored sources (the release py-lmdb links, same on-disk format), so installing
# needs no system liblmdb. Third-party code: its own warnings stay off, no sanitizers.
add_library(vivace_lmdb STATIC
  ${CMAKE_CURRENT_SOURCE_DIR}/csrc/third_party/lmdb/mdb.c
  ${CMAKE_CURRENT_SOURCE_DIR}/csrc/third_party/lmdb/midl.c
)
target_include_directories(vivace_lmdb SYSTEM PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/csrc/third_party/lmdb)
target_compile_options(vivace_lmdb PRIVATE -w)
target_link_libraries(vivace_lmdb PUBLIC Threads::Threads)
target_link_libraries(vivace_native PUBLIC vivace_lmdb)
