// Compiled by ctest against the kvcache module's include view (see
// tests/CMakeLists.txt): the model sits above the cache, so with
// KVQ_PROBE_UPWARD this must fail to compile, and without it it must compile.
#include "kvcache/kv_cache.h"
#ifdef KVQ_PROBE_UPWARD
#include "model/llama.h"
#endif

int main() { return 0; }
