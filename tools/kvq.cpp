#include <cstdio>
int main() { std::puts("kvq"); return 0; }
