target_sources(vivace_native PRIVATE
  ${CMAKE_CURRENT_LIST_DIR}/frontend.cpp
  ${CMAKE_CURRENT_LIST_DIR}/http_parse.cpp
  ${CMAKE_CURRENT_LIST_DIR}/loadgen.cpp
  ${CMAKE_CURRENT_LIST_DIR}/otlp.cpp
  ${CMAKE_CURRENT_LIST_DIR}/sha256.cpp
)
