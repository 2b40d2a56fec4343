#include <stdio.h>
#include "../src/calc.h"

static int failures;

#define CHECK_EQ(expected, actual)                                              \
    do {                                                                        \
        int e_ = (expected), a_ = (actual);                                     \
        if (e_ != a_) {                                                         \
            fprintf(stderr, "FAIL %s:%d: %s: expected %d, got %d\n",            \
                    __FILE__, __LINE__, #actual, e_, a_);                       \
            failures++;                                                         \
        }                                                                       \
    } while (0)

int main(void) {
    CHECK_EQ(5, calc_add(2, 3));
    CHECK_EQ(-1, calc_sub(2, 3));
    CHECK_EQ(4, calc_sub(7, 3));
    CHECK_EQ(6, calc_mul(2, 3));
    if (failures) {
        fprintf(stderr, "%d check(s) failed\n", failures);
        return 1;
    }
    printf("all checks passed\n");
    return 0;
}
