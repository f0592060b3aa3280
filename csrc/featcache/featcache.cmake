# The feature cache reads the LMDB online store through the system liblmdb.
find_path(LMDB_INCLUDE_DIR lmdb.h)
find_library(LMDB_LIBRARY NAMES lmdb)
if(NOT LMDB_INCLUDE_DIR OR NOT LMDB_LIBRARY)
  message(FATAL_ERROR "vivace: the feature cache (csrc/featcache) needs liblmdb: "
                      "apt-get install liblmdb-dev (Debian/Ubuntu), dnf install lmdb-devel, brew install lmdb")
endif()
target_include_directories(vivace_native PUBLIC ${LMDB_INCLUDE_DIR})
target_link_libraries(vivace_native PUBLIC ${LMDB_LIBRARY})
message(STATUS "vivace: featcache uses ${LMDB_LIBRARY}")
